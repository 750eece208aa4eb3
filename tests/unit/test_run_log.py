"""Metrics to JSONL, TensorBoard and W&B (offline, no network), appended across resumes, the
console's line per step, and plots."""

import socket
import subprocess
import sys
import threading
import time

import pytest

from routing_replay import cli, run_log
from routing_replay.config import WandbSection


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


@pytest.fixture
def no_network(tmp_path, monkeypatch):
    """W&B pointed at a local socket that records every connection (its server URL and the HTTP(S)
    proxies), its own files kept under tmp_path; yields the list of connections."""
    server = socket.create_server(("127.0.0.1", 0))
    connections = []

    def accept():
        while True:
            try:
                connection, address = server.accept()
            except OSError:
                return
            connections.append(address)
            connection.close()

    threading.Thread(target=accept, daemon=True).start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    for name in ("WANDB_BASE_URL", "HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(name, url)
    for name in ("NO_PROXY", "no_proxy", "WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    for name, folder in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / folder))
    yield connections
    server.close()


def wandb_history(run_file) -> list[dict[str, float]]:
    """The metrics of an offline run's ``run-ID.wandb`` file (W&B's own record reader)."""
    import json

    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal import datastore

    store = datastore.DataStore()
    store.open_for_scan(str(run_file))
    rows = []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            rows.append({name: value for name, value in items.items() if not name.startswith("_") or name == "_step"})
    return rows


def test_wandb_offline_writes_the_same_metrics_under_the_run_dir_and_a_resume_keeps_the_run_id(tmp_path, no_network):
    run_dir = tmp_path / "my-run"
    settings = WandbSection(project="routing-replay-tests", mode="offline")
    with run_log.RunLog(run_dir, tensorboard=False, wandb=settings, config={"train": {"replay": "R3"}}) as log:
        log.log(0, {"sft/loss_first": 6.0})
        log.log(1, {"reward/mean": 0.25, "mismatch/k3": 1e-3, "staleness/mb1/k3": 2e-4})
    with run_log.RunLog(run_dir, tensorboard=False, wandb=settings) as log:  # resumed from step 1
        log.log(2, {"reward/mean": 0.5, "mismatch/k3": 2e-3, "staleness/mb1/k3": 3e-4})
    run_id = (run_dir / run_log.WANDB_ID_FILE).read_text().strip()
    # offline-run-DATE-ID, and offline-run-DATE-ID-1 when the second part starts within the same second
    parts = list((run_dir / "wandb").glob(f"offline-run-*-{run_id}*/run-{run_id}.wandb"))
    assert len(parts) == 2, list((run_dir / "wandb").iterdir())  # both parts of the run carry its id
    jsonl = run_log.read(run_dir)
    deadline = time.monotonic() + 30
    while True:  # W&B's service process may write a part's last records just after finish() returns
        history = sorted(wandb_history(parts[0]) + wandb_history(parts[1]), key=lambda row: row["_step"])
        if len(history) >= len(jsonl) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [{"_step": r.pop("step"), **r} for r in jsonl] == history  # the same names, values and steps
    assert no_network == []


def test_wandb_disabled_writes_nothing(tmp_path, no_network):
    run_dir = tmp_path / "run"
    with run_log.RunLog(run_dir, tensorboard=False, wandb=WandbSection(project="p", mode="disabled")) as log:
        log.log(1, {"reward/mean": 0.5})
    assert [path.name for path in run_dir.iterdir()] == ["metrics.jsonl"]
    assert no_network == []


def test_wandb_that_cannot_start_is_one_error_naming_the_cause_and_the_way_out(tmp_path, no_network, monkeypatch):
    """W&B's own exception (here what it raises online without an API key) becomes one line that the
    job reports as a JobError, not a traceback; the metrics file is closed again."""
    import wandb

    def init(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty). call wandb.login(key=[your_api_key])")

    monkeypatch.setattr(wandb, "init", init)
    with pytest.raises(run_log.MetricsLogError, match=r"run\.wandb: W&B could not start the run \(project 'p', "
                       r"mode online\): UsageError: api_key not configured .* set run\.wandb\.mode: offline"):
        run_log.RunLog(tmp_path, tensorboard=False, wandb=WandbSection(project="p", mode="online"))
    assert run_log.read(tmp_path) == []


def r3_metrics(mini_batches: int) -> dict[str, float]:
    return {"reward/mean": 0.6875, "reward/std": 0.4, "mismatch/k3": 2.376e-05, "time/step": 1.6691,
            "routing/agreement/layer0": 0.998, "routing/agreement/layer1": 0.994, "paired/flip_share": 0.004,
            **{f"staleness/mb{i}/k3": 1e-4 * i for i in range(mini_batches)},
            **{f"replay/agreement/mb{i}": 1.0 - 0.01 * i for i in range(mini_batches)}}


def test_summary_line_names_reward_mismatch_last_staleness_agreement_and_time():
    assert run_log.summary_line(12, r3_metrics(4), 4) == (
        "step 12: reward 0.688, mismatch k3 2.38e-05, staleness k3 mb3 3.00e-04, routing agreement 0.9960, "
        "replay agreement mb3 0.9700, 1.67 s")
    on_policy = run_log.summary_line(1, r3_metrics(1), 1)
    assert "staleness k3 mb0 0.00e+00" in on_policy and "replay agreement mb0 1.0000" in on_policy


def test_summary_line_leaves_out_what_a_mode_does_not_log():
    # R2 / none with paired diagnostics: no replayed-forward agreement; the flips give it
    paired = {k: v for k, v in r3_metrics(2).items() if not k.startswith("routing/")}
    assert "routing agreement 0.9960" in run_log.summary_line(3, paired, 2)
    # without paired diagnostics: neither
    bare = {k: v for k, v in paired.items() if not k.startswith("paired/")}
    line = run_log.summary_line(3, bare, 2)
    assert "routing agreement" not in line and "replay agreement mb1 0.9900" in line
    assert run_log.summary_line(0, {"sft/loss_first": 6.0}, 4) == "step 0"


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
