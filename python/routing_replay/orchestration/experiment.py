"""The seed's experiment: replay none / R2 / R3 x mini-batches per rollout batch x seeds.

Per seed, one supervised warm start gives the weights every cell of that seed starts from; each
(replay, mini-batches) cell then runs ``steps`` RL steps on the same prompts (prompt sampling is
seeded by the run seed and the step), in a shuffled order, one job at a time on one Ray. Every
cell is an ordinary run directory (metrics.jsonl, TensorBoard, plots) whose paired diagnostics
score each batch under both routings, so mismatch comparisons between routings are exact within a
cell; across cells they compare runs from the same weights and prompts. The experiment writes
``summary.csv`` and ``summary.md`` (a row per cell) and comparison plots.
"""

from __future__ import annotations

import csv
import logging
import random
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from routing_replay import config as job_config
from routing_replay.orchestration.trainer_settings import ReplayMode

log = logging.getLogger(__name__)


class Grid(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    replay: list[ReplayMode] = Field(default=["none", "R2", "R3"], min_length=1)
    mini_batches: list[int] = Field(default=[1, 4, 8], min_length=1)
    """Optimizer steps per rollout batch (1 = on-policy)."""
    seeds: list[int] = Field(default=[0, 1, 2], min_length=1)
    steps: int = Field(default=6, ge=1)
    """RL steps per cell, after the seed's warm start."""


class ExperimentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    job: str
    """The job configuration every cell starts from (a path relative to the experiment file)."""
    output_dir: str = "runs/experiments/seed-claims"
    grid: Grid = Grid()
    quick: Grid = Grid(replay=["none", "R2", "R3"], mini_batches=[2], seeds=[0], steps=2)
    """The grid of ``--quick`` (CI)."""


@dataclass(frozen=True)
class Cell:
    seed: int
    replay: str
    mini_batches: int

    @property
    def name(self) -> str:
        return f"seed{self.seed}-{self.replay}-mb{self.mini_batches}"


def load(path: str | Path, overrides: Sequence[str] = (),
         job_overrides: Sequence[str] = ()) -> tuple[ExperimentConfig, job_config.JobConfig]:
    """The experiment and its base job, both strictly validated (ConfigError names the field), with
    ``overrides`` (``grid.steps=2``, as ``--set`` gives them) merged into the experiment and
    ``job_overrides`` (``rollout.max_new_tokens=16``, as ``--set-job`` gives them) into the base job
    that every cell derives from."""
    path = Path(path)
    experiment = job_config.load(path, ExperimentConfig, overrides)
    base = job_config.load(path.parent / experiment.job, overrides=job_overrides, flag="--set-job")
    return experiment, base


def cells_of(grid: Grid) -> list[Cell]:
    """Every cell, seed by seed; within a seed in a shuffled (seeded) order, so no mode always runs
    first on a machine that warms up or slows down."""
    cells = []
    for seed in grid.seeds:
        mine = [Cell(seed, replay, n) for replay in grid.replay for n in grid.mini_batches]
        random.Random(f"experiment-order-{seed}").shuffle(mine)
        cells += mine
    return cells


def cell_config(base: job_config.JobConfig, cell: Cell, warm: Path, steps: int, out: Path) -> job_config.JobConfig:
    """The base job from the seed's warm weights, with the cell's replay mode and mini-batches."""
    return base.model_copy(update={
        "model": base.model.model_copy(update={"path": str(warm), "tiny": None, "architecture": None}),
        "train": replace(base.train, replay=cell.replay, mini_batches=cell.mini_batches, steps=steps),
        "task": base.task.model_copy(update={"sft_warmup_steps": 0}),
        "run": base.run.model_copy(update={"seed": cell.seed, "output_dir": str(out), "checkpoint_every": 0}),
    })


def run(experiment: ExperimentConfig, base: job_config.JobConfig, *, quick: bool = False,
        output_dir: str | None = None, progress: bool = True) -> Path:
    """Runs the grid (or the quick grid) and writes the summary; returns the experiment directory."""
    from tqdm import tqdm

    from routing_replay import run_log
    from routing_replay.orchestration.cluster import connect
    from routing_replay.orchestration.driver import Job, Options

    grid = experiment.quick if quick else experiment.grid
    out = Path(output_dir or experiment.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cells = cells_of(grid)
    started_ray = connect(base)
    try:
        warm: dict[int, Path] = {}
        for cell in tqdm(cells, desc="experiment", unit="cell", disable=not progress):
            if cell.seed not in warm:
                warm[cell.seed] = warm_start(base, cell.seed, out / f"seed{cell.seed}-warm")
            cfg = cell_config(base, cell, warm[cell.seed], grid.steps, out / cell.name)
            log.info("experiment cell %s", cell.name)
            with Job(cfg, Options(fresh=True, progress=False)) as job:
                job.run()
            run_log.plot(out / cell.name)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    rows = [summarise(cell, run_log.read(out / cell.name)) for cell in cells]
    write_summary(rows, out)
    from routing_replay.experiment_plots import plot_experiment

    plot_experiment(out, cells)
    return out


def warm_start(base: job_config.JobConfig, seed: int, out: Path) -> Path:
    """The seed's starting weights: the base job's supervised warm start, exported as a Hugging Face
    checkpoint (with the tokenizer) that every cell of the seed loads."""
    from routing_replay.orchestration.driver import Job, Options

    weights = out / "weights"
    if (weights / "config.json").exists():
        return weights
    cfg = base.model_copy(update={  # train.steps does not matter: the job runs no RL step (no Job.run)
        "run": base.run.model_copy(update={"seed": seed, "output_dir": str(out / "run"), "checkpoint_every": 0}),
    })
    with Job(cfg, Options(fresh=True, progress=False)) as job:
        staged = job.checkpoint(0) / "hf"
        tokenizer_dir = Path(job.model_path)
    staging = out / "weights.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(staged, staging)
    for source in tokenizer_dir.iterdir():
        if "token" in source.name or source.name.endswith(".jinja"):
            shutil.copy2(source, staging / source.name)
    staging.rename(weights)
    return weights


# The summary: per cell, means over its steps of what tests the seed's claims.
SUMMARY_COLUMNS = {
    "own_k3": "paired/own/k3",
    "rollout_k3": "paired/rollout/k3",
    "own_p99": "paired/own/p99",
    "rollout_p99": "paired/rollout/p99",
    "own_max": "paired/own/max",
    "rollout_max": "paired/rollout/max",
    "flip_share": "paired/flip_share",
    "tokens_flipped": "paired/tokens_flipped_share",
    "flipped_k3_share": "paired/flipped_k3_share",
    "unflipped_k3_own": "paired/own/unflipped/k3",
    "unflipped_k3_rollout": "paired/rollout/unflipped/k3",
    "mismatch_k3": "mismatch/k3",
    "staleness_mb0": "staleness/mb0/mean_abs",
}


def summarise(cell: Cell, records: list[dict]) -> dict[str, float | int | str]:
    steps = [r for r in records if r["step"] > 0 and "reward/mean" in r]
    if not steps:
        raise ValueError(f"{cell.name}: no RL step was logged")
    last = cell.mini_batches - 1
    row: dict[str, float | int | str] = {"seed": cell.seed, "replay": cell.replay, "mini_batches": cell.mini_batches,
                                         "steps": len(steps), "reward_first": steps[0]["reward/mean"]}
    row.update({column: _mean(steps, metric) for column, metric in SUMMARY_COLUMNS.items()})
    row["reward_last"] = steps[-1]["reward/mean"]
    row["k3_reduction"] = _ratio(row["own_k3"], row["rollout_k3"])
    row["staleness_last_mb"] = _mean(steps, f"staleness/mb{last}/mean_abs")
    row["agreement_last_mb"] = _mean(steps, f"replay/agreement/mb{last}")
    row["clip_last_mb"] = _mean(steps, f"clip_fraction/mb{last}")
    return row


def _mean(records: list[dict], metric: str) -> float:
    values = [r[metric] for r in records if metric in r]
    return sum(values) / len(values) if values else float("nan")


def _ratio(numerator: float | int | str, denominator: float | int | str) -> float:
    return float(numerator) / float(denominator) if float(denominator) else float("nan")


def write_summary(rows: list[dict], out: Path) -> None:
    columns = list(rows[0])
    with open(out / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell_text(row[c]) for c in columns) + " |" for row in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def _cell_text(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
