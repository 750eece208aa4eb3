"""Per-step metrics of a run: one JSON object per line in ``metrics.jsonl``, the same scalars in
TensorBoard, and ``routing-replay plot RUN_DIR`` to draw PNG curves of them.

Metrics are flat ``{name: float}`` maps; names use ``/`` to group (``mismatch/k3``,
``staleness/mb1/mean_abs``). Appending (not rewriting) lets a resumed run continue its curves.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class RunLog:
    def __init__(self, run_dir: str | Path, tensorboard: bool = True, purge_step: int | None = None) -> None:
        """``purge_step``: a resumed run's first step; TensorBoard hides older events from there on."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=purge_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        bad = sorted(k for k, v in metrics.items() if not isinstance(v, (int, float)) or not math.isfinite(v))
        if bad:
            raise ValueError(f"step {step}: metrics must be finite numbers; not so: {bad}")
        self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in metrics.items():
                self._tb.add_scalar(name, value, step)
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class MetricsError(ValueError):
    """A run's metrics.jsonl is missing or malformed; the message names the file and the line."""


def read(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        raise MetricsError(f"{path} does not exist: is {run_dir} a run directory?")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise MetricsError(f"{path}: cannot read: {exc}") from None
    return [_record(line, f"{path}, line {number}") for number, line in enumerate(lines, 1) if line.strip()]


def _record(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise MetricsError(f"{where}: not JSON: {exc}") from None
    numbers = isinstance(record, dict) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in record.values())
    if not numbers or not isinstance(record.get("step"), int):
        raise MetricsError(f"{where}: not a metrics record (an object of numbers with an integer step)")
    return record


def plot(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """One PNG per metric group (the part before the first ``/``), a curve per metric; returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    groups: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        for name, value in record.items():
            if name != "step":
                groups[name.split("/", 1)[0]][name].append((record["step"], value))
    files = []
    for group, curves in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in sorted(curves.items()):
            steps, values = zip(*points)
            ax.plot(steps, values, label=name, marker="." if len(points) < 30 else None)
        ax.set_xlabel("step")
        ax.set_title(group)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out / f"{group.replace(' ', '_')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files.append(path)
    return files
