"""The experiment's configuration, grid, per-cell jobs, summary and plots, without running jobs."""

import json
from pathlib import Path

import pytest

from routing_replay import config
from routing_replay.experiment_plots import plot_experiment
from routing_replay.orchestration import experiment

CONFIG = Path(__file__).parents[2] / "configs/experiments/seed-claims.yaml"


def test_the_shipped_experiment_loads_and_every_cell_passes_the_dry_run(tmp_path):
    spec, base = experiment.load(CONFIG)
    assert base.model.rollout_dtype == "bfloat16" and base.model.train_dtype == "float32"
    for grid in (spec.grid, spec.quick):
        for cell in experiment.cells_of(grid):
            cfg = experiment.cell_config(base, cell, tmp_path / "warm", grid.steps, tmp_path / cell.name)
            assert cfg.train.replay == cell.replay and cfg.train.mini_batches == cell.mini_batches
            # the cell's learning-rate schedule spans its own optimizer steps
            assert cfg.train.optimizer.total_steps == grid.steps * cell.mini_batches
            assert cfg.run.seed == cell.seed and cfg.task.sft_warmup_steps == 0
            assert config.validate_job(cfg, config.architecture_of(base)) == []


def test_the_grid_is_complete_and_shuffled_within_each_seed():
    grid = experiment.Grid(replay=["none", "R2", "R3"], mini_batches=[1, 4, 8], seeds=[0, 1, 2], steps=1)
    cells = experiment.cells_of(grid)
    assert len(cells) == len(set(cells)) == 27
    assert [c.seed for c in cells] == sorted(c.seed for c in cells)  # one warm start per seed, then its cells
    orders = [[(c.replay, c.mini_batches) for c in cells if c.seed == s] for s in (0, 1, 2)]
    assert len({tuple(order) for order in orders}) > 1  # each seed its own order
    assert experiment.cells_of(grid) == cells  # seeded: the same order every run


def test_a_bad_experiment_names_the_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("job: ../x.yaml\ngrid: {replay: [R4]}\n")
    with pytest.raises(config.ConfigError, match=r"grid\.replay\.0"):
        experiment.load(path)
    path.write_text("job: ../x.yaml\ngrid: {seeds: [0]}\nextra: 1\n")
    with pytest.raises(config.ConfigError, match="extra: unknown key; allowed: job, output_dir, grid, quick"):
        experiment.load(path)


def test_overrides_reach_the_experiment_and_its_base_job_and_name_their_flag():
    spec, base = experiment.load(CONFIG, ["grid.steps=2", "grid.seeds=[4]"],
                                 ["rollout.temperature=0.9", "train.optimizer.learning_rate=1.0e-6"])
    assert (spec.grid.steps, spec.grid.seeds, spec.grid.replay) == (2, [4], ["none", "R2", "R3"])
    assert (base.rollout.temperature, base.train.optimizer.learning_rate) == (0.9, 1e-6)
    cell = experiment.cells_of(spec.grid)[0]
    assert experiment.cell_config(base, cell, Path("warm"), 2, Path("out")).rollout.temperature == 0.9
    with pytest.raises(config.ConfigError, match=r"--set grid\.replay=\[R9\]: grid\.replay\.0: "):
        experiment.load(CONFIG, ["grid.replay=[R9]"])
    with pytest.raises(config.ConfigError, match=r"--set-job train\.replay=R9: train\.replay: "):
        experiment.load(CONFIG, job_overrides=["train.replay=R9"])


def test_the_experiment_command_documents_and_applies_its_overrides(capsys):
    from routing_replay import cli

    parser = cli.build_parser()
    args = parser.parse_args(["experiment", "--config", str(CONFIG), "--set", "grid.steps=2",
                              "--set-job", "rollout.temperature=0.9"])
    assert (args.overrides, args.job_overrides) == (["grid.steps=2"], ["rollout.temperature=0.9"])
    assert cli.main(["experiment", "--config", str(CONFIG), "--set-job", "train.replay=R9"]) == 2
    assert "--set-job train.replay=R9" in capsys.readouterr().err


def synthetic_run(directory: Path, cell: experiment.Cell, steps: int = 3) -> None:
    directory.mkdir(parents=True)
    lines = [{"step": 0, "sft/loss_first": 2.0, "sft/loss_last": 1.0}]
    for step in range(1, steps + 1):
        record = {"step": step, "reward/mean": 0.1 * step, "mismatch/k3": 1e-4,
                  "paired/own/k3": 2e-4, "paired/rollout/k3": 5e-5 if cell.replay == "R3" else 2e-4,
                  "paired/own/p99": 0.02, "paired/rollout/p99": 0.01, "paired/own/max": 0.3,
                  "paired/rollout/max": 0.1, "paired/flip_share": 0.01, "paired/tokens_flipped_share": 0.2,
                  "paired/flipped_k3_share": 0.5, "paired/own/unflipped/k3": 1e-5, "paired/rollout/unflipped/k3": 1e-5}
        for i in range(cell.mini_batches):
            record.update({f"staleness/mb{i}/mean_abs": 0.01 * i, f"replay/agreement/mb{i}": 1 - 0.1 * i,
                           f"clip_fraction/mb{i}": 0.02 * i})
        lines.append(record)
    (directory / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def test_summary_and_comparison_plots_of_a_grid(tmp_path):
    cells = [experiment.Cell(0, mode, n) for mode in ("none", "R2", "R3") for n in (1, 4)]
    for cell in cells:
        synthetic_run(tmp_path / cell.name, cell)
    rows = [experiment.summarise(cell, json_records(tmp_path / cell.name)) for cell in cells]
    r3 = next(row for row in rows if row["replay"] == "R3" and row["mini_batches"] == 4)
    assert r3["k3_reduction"] == pytest.approx(4.0) and r3["steps"] == 3
    assert r3["staleness_last_mb"] == pytest.approx(0.03) and r3["agreement_last_mb"] == pytest.approx(0.7)
    assert r3["reward_first"] == pytest.approx(0.1) and r3["reward_last"] == pytest.approx(0.3)
    experiment.write_summary(rows, tmp_path)
    assert len((tmp_path / "summary.csv").read_text().splitlines()) == 1 + len(cells)
    assert (tmp_path / "summary.md").read_text().count("\n") == 2 + len(cells)
    written = {path.name for path in plot_experiment(tmp_path, cells)}
    assert written == {"mismatch-by-mode.png", "flips-by-mode.png", "staleness-by-mini-batch.png",
                       "replay-by-mini-batch.png", "clip-fraction-by-mini-batch.png", "reward.png"}


def json_records(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
