"""A job error ends `routing-replay train` with exit code 1 and the error's message: the real CLI,
refusing to overwrite an existing run (neither --resume nor --fresh), before Ray or any engine
starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.test_rl_job import job_config


@pytest.mark.timeout(240)
def test_a_job_error_exits_1_with_its_message(tmp_path):
    """An output_dir that holds a run, started without --resume or --fresh: exit 1, the refusal
    with both fixes on stderr, and the run's metrics untouched."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    metrics = json.dumps({"step": 3, "reward/mean": 0.25}) + "\n"
    (run_dir / "metrics.jsonl").write_text(metrics)
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job_config(run_dir).model_dump(mode="json")))  # JSON is YAML
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([str(Path(sys.executable).parent / "routing-replay"), "train", "--config", str(path),
                          "--no-progress"], capture_output=True, text=True, env=env, timeout=200)
    assert out.returncode == 1, out.stdout + out.stderr
    assert (f"routing-replay train: {run_dir} already holds a run: pass --resume to continue it or --fresh to "
            "replace it\n") in out.stderr
    assert (run_dir / "metrics.jsonl").read_text() == metrics
