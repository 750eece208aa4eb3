"""Checkpoints of a run, written atomically: a step's directory is complete or absent.

Layout under ``RUN_DIR/checkpoints``: ``step-000010/`` (``state.json``: step, seed, data position;
``trainer/``: megatron-core dist_checkpointing of every trainer rank's model, optimizer, schedule and
RNG; ``hf/``: the Hugging Face weights the engines serve) and ``latest`` (the newest complete step's
name, replaced atomically). A step is written into ``step-000010.tmp`` and renamed when whole.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunState:
    step: int
    """The last completed RL step."""
    seed: int
    config_digest: str
    """The job configuration's digest: resuming under another configuration is refused."""
    prompts_drawn: int
    """The data position: prompts sampled so far (step k draws its batch from the seed and k alone,
    so a resumed run continues with step k + 1's batch)."""


class Checkpoints:
    def __init__(self, run_dir: str | Path, keep: int = 2) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def staging(self, step: int) -> Path:
        """An empty directory to write step ``step`` into; ``commit`` publishes it."""
        path = self.root / f"step-{step:06d}.tmp"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def commit(self, staged: Path, state: RunState) -> Path:
        (staged / "state.json").write_text(json.dumps(asdict(state)))
        final = staged.with_suffix("")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staged, final)
        pointer = self.root / "latest.tmp"
        pointer.write_text(final.name)
        os.replace(pointer, self.root / "latest")
        for old in sorted(self.root.glob("step-*"))[: -self.keep]:
            if old.suffix != ".tmp" and old != final:
                shutil.rmtree(old, ignore_errors=True)
        return final

    def latest(self) -> tuple[Path, RunState] | None:
        pointer = self.root / "latest"
        if not pointer.exists():
            return None
        path = self.root / pointer.read_text().strip()
        return path, RunState(**json.loads((path / "state.json").read_text()))
