"""Metrics to JSONL and TensorBoard, appended across resumes, and plotted."""

import subprocess
import sys

import pytest

from routing_replay import cli, run_log


def test_metrics_go_to_jsonl_and_tensorboard_and_resume_appends(tmp_path):
    with run_log.RunLog(tmp_path) as log:
        log.log(0, {"reward/mean": 0.1, "mismatch/k3": 0.01})
        log.log(1, {"reward/mean": 0.3, "mismatch/k3": 0.02})
    with run_log.RunLog(tmp_path) as log:  # a resumed run continues the same curves
        log.log(2, {"reward/mean": 0.5, "mismatch/k3": 0.015})
    records = run_log.read(tmp_path)
    assert [r["step"] for r in records] == [0, 1, 2]
    assert [r["reward/mean"] for r in records] == [0.1, 0.3, 0.5]
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_non_finite_metrics_are_refused(tmp_path):
    with run_log.RunLog(tmp_path, tensorboard=False) as log, pytest.raises(ValueError, match="mismatch/k3"):
        log.log(0, {"reward/mean": 1.0, "mismatch/k3": float("nan")})


STATS = ("tokens", "mean", "mean_abs", "std", "p50", "p90", "p99", "max", "k1", "k3", "beyond_2", "beyond_5")
MINI_BATCHES = 4


def ratio_stats(prefix: str, scale: float) -> dict[str, float]:
    """A ratio metric's statistics around ``scale`` (|log r|), as the trainer names them."""
    values = {"tokens": 500.0, "mean": 0.1 * scale, "mean_abs": scale, "std": 1.3 * scale, "p50": 0.6 * scale,
              "p90": 2 * scale, "p99": 5 * scale, "max": 30 * scale, "k1": -0.1 * scale, "k3": scale * scale / 2,
              "beyond_2": scale / 3, "beyond_5": scale / 10}
    return {f"{prefix}/{stat}": values[stat] for stat in STATS}


def step_metrics(step: int, mismatch: float, paired: bool) -> dict[str, float]:
    metrics = {"reward/mean": 0.2 + 0.02 * step, "reward/std": 0.4, "entropy": 1.0, "routing/coverage": 1.0,
               "time/step": 3.0, "sync/probe_max_abs_diff": 0.01, **ratio_stats("mismatch", mismatch)}
    for i in range(MINI_BATCHES):
        staleness = 1e-4 * 10**i if i else 0.0  # mb0 is on-policy, later ones are further off-policy
        metrics |= ratio_stats(f"staleness/mb{i}", staleness) | ratio_stats(f"ratio/mb{i}", mismatch + staleness)
        metrics |= {f"staleness/mb{i}/outside_clip": 0.01 * i, f"clip_fraction/mb{i}": 0.01 * (i + 1),
                    f"correction/mb{i}/weight_mean": 1.0, f"correction/mb{i}/changed": 0.001 * i,
                    f"loss/mb{i}": 0.01, f"grad_norm/mb{i}": 1.0, f"replay/agreement/mb{i}": 1.0 - 0.01 * i}
    if paired:
        for side, scale in (("own", 4 * mismatch), ("rollout", mismatch)):
            metrics |= ratio_stats(f"paired/{side}", scale)
            metrics |= ratio_stats(f"paired/{side}/flipped", 10 * scale) | ratio_stats(f"paired/{side}/unflipped", scale)
        metrics |= {"paired/flip_share": 0.05, "paired/tokens_flipped_share": 0.15, "paired/k3_reduction": 3.0,
                    "paired/flipped_k3_share": 0.4}
        metrics |= {f"paired/flip_share/layer{layer}": 0.02 * (layer + 1) for layer in range(4)}
    return metrics


def make_run(run_dir, mismatch: float, paired: bool = True, steps: int = 6):
    with run_log.RunLog(run_dir, tensorboard=False) as log:
        log.log(0, {"sft/loss_first": 6.0, "sft/loss_last": 1.5})
        for step in range(1, steps + 1):
            log.log(step, step_metrics(step, mismatch, paired))
    return run_dir


def family(name: str) -> run_log.Family:
    return next(f for f in run_log.FAMILIES if f.name == name)


def panel_axes(figure, title: str):
    return next(axes for axes in figure.axes if axes.get_title().startswith(title))


def legend_labels(figure) -> list[str]:
    return [text.get_text() for legend in figure.legends for text in legend.get_texts()]


@pytest.fixture
def two_runs(tmp_path):
    return make_run(tmp_path / "r3", 1e-3), make_run(tmp_path / "none", 4e-3, paired=False)


def test_one_png_per_family_with_data_and_none_for_a_family_without(two_runs, tmp_path):
    r3, none = two_runs
    expected = ["clipping", "mismatch", "other", "paired", "ratio", "replay", "reward", "rollout", "routing",
                "staleness", "time", "update"]
    files = run_log.plot(r3)
    assert sorted(path.stem for path in files) == expected
    assert all(path.parent == r3 / "plots" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for path in files)
    # a run without paired diagnostics: no paired.png, and no per-layer flip panel among the routing ones
    assert "paired" not in [path.stem for path in run_log.plot(none, tmp_path / "none-plots")]
    routing = run_log.figure(family("routing"), {"none": run_log.series(run_log.read(none))})
    assert [axes.get_title() for axes in routing.axes if axes.get_visible()] == [
        "loss tokens whose rollout routing arrived"]


def test_one_line_per_mini_batch_on_a_log_axis_when_values_span_decades(two_runs):
    r3 = {"r3": run_log.series(run_log.read(two_runs[0]))}
    ratio = run_log.figure(family("ratio"), r3)
    k3 = panel_axes(ratio, "k3 = ")
    assert k3.get_yscale() == "log"  # 5e-7 .. 5e-3
    assert len(k3.get_lines()) == MINI_BATCHES
    assert legend_labels(ratio) == ["mb0", "mb1", "mb2", "mb3"]
    colours = [line.get_color() for line in k3.get_lines()]
    assert len(set(map(tuple, colours))) == MINI_BATCHES  # a sequential colormap, one shade per index
    assert [axes.get_xlabel() for axes in ratio.axes[-2:]] == ["step", "step"]
    staleness = run_log.figure(family("staleness"), r3)
    assert panel_axes(staleness, "k3 = ").get_yscale() == "symlog"  # 5e-7 .. 5e-3 and mb0's zeros
    clipping = run_log.figure(family("clipping"), r3)
    assert panel_axes(clipping, "tokens on the clipped branch").get_yscale() == "linear"  # 0.01 .. 0.04


def test_paired_panels_draw_own_against_rollout_routing(two_runs):
    figure = run_log.figure(family("paired"), {"r3": run_log.series(run_log.read(two_runs[0]))})
    k3 = panel_axes(figure, "k3 = ")
    assert [line.get_linestyle() for line in k3.get_lines()] == ["-", "--"]
    assert legend_labels(figure) == ["own routing", "rollout's routing (replayed)"]
    assert panel_axes(figure, "tokens with a flip in some layer").get_lines()[0].get_ydata()[0] == 0.15


def test_overlaid_runs_are_labelled_by_directory_name(two_runs, tmp_path):
    r3, none = two_runs
    assert cli.main(["plot", str(r3), str(none), "--out", str(tmp_path / "both")]) == 0
    assert (tmp_path / "both" / "mismatch.png").is_file()
    runs = {name: run_log.series(run_log.read(run)) for name, run in zip(run_log.run_labels([r3, none]), (r3, none))}
    figure = run_log.figure(family("mismatch"), runs)
    assert legend_labels(figure) == ["r3", "none"]
    assert len(panel_axes(figure, "max |log r|").get_lines()) == 2
    staleness = run_log.figure(family("staleness"), runs)
    assert panel_axes(staleness, "mean |log r| (last mini-batch)").get_lines()[0].get_ydata()[0] == 1e-1
    paired = run_log.figure(family("paired"), runs)  # only r3 has paired diagnostics
    assert legend_labels(paired) == ["r3: own routing", "r3: rollout's routing (replayed)", "r3"]


def test_run_labels_fall_back_to_paths_when_names_repeat(tmp_path):
    assert run_log.run_labels([tmp_path / "a" / "run", tmp_path / "b" / "run"]) == ["a/run", "b/run"]
    with pytest.raises(run_log.MetricsError, match="given twice"):
        run_log.run_labels([tmp_path / "a", tmp_path / "x" / ".." / "a"])


def test_plot_command_writes_beside_the_runs_by_default(tmp_path):
    with run_log.RunLog(tmp_path / "a", tensorboard=False) as log:
        for step in range(5):
            log.log(step, {"reward/mean": step / 5, "reward/std": 0.1, "staleness/mb1/mean_abs": 0.01 * step})
    out = subprocess.run([sys.executable, "-m", "routing_replay.cli", "plot", str(tmp_path / "a")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in (tmp_path / "a" / "plots").glob("*.png")) == ["reward.png", "staleness.png"]
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.jsonl").write_text((tmp_path / "a" / "metrics.jsonl").read_text())
    assert cli.main(["plot", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert (tmp_path / "plots-a-vs-b" / "reward.png").is_file()
