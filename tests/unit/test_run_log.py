"""Metrics to JSONL and TensorBoard, appended across resumes, and plotted."""

import subprocess
import sys

import pytest

from routing_replay import run_log


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


def test_plot_command_draws_one_png_per_group(tmp_path):
    with run_log.RunLog(tmp_path, tensorboard=False) as log:
        for step in range(5):
            log.log(step, {"reward/mean": step / 5, "reward/std": 0.1, "staleness/mb1/mean_abs": 0.01 * step})
    out = subprocess.run([sys.executable, "-m", "routing_replay.cli", "plot", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    pngs = sorted(p.name for p in (tmp_path / "plots").glob("*.png"))
    assert pngs == ["reward.png", "staleness.png"]
    assert all((tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in pngs)
