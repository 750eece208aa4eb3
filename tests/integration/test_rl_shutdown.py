"""Ctrl-C stops the whole job: the driver (its own local Ray) exits with 130, and no SGLang process
of its engine is left behind. This job syncs weights through safetensors on disk: its first step
completes only if the engine then scores the probe like the trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.test_rl_job import job_config


def process_group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def sglang_servers_of(run_dir: Path) -> list[int]:
    """pids (= process groups) of SGLang servers serving weights under ``run_dir``."""
    out = subprocess.run(["pgrep", "-f", f"sglang.launch_server --model-path {run_dir}"], capture_output=True,
                         text=True)
    return [int(pid) for pid in out.stdout.split()]


@pytest.mark.timeout(480)
def test_ctrl_c_stops_every_process(tmp_path):
    run_dir = tmp_path / "run"
    cfg = job_config(run_dir, steps=1000)
    path = tmp_path / "job.yaml"
    raw = cfg.model_dump(mode="json")
    raw["task"]["sft_warmup_steps"] = 0
    raw["rollout"]["weight_sync"] = "disk"
    path.write_text(json.dumps(raw))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    driver = subprocess.Popen([str(Path(sys.executable).parent / "routing-replay"), "train", "--config", str(path),
                               "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):
            assert driver.poll() is None, driver.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "the job did not complete a step in 300 s"
            time.sleep(1)
        servers = sglang_servers_of(run_dir)
        assert servers, "no SGLang server found for the running job"
        driver.send_signal(signal.SIGINT)
        output, _ = driver.communicate(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, output[-3000:]
    assert "interrupted; every engine, trainer and worker was stopped" in output
    deadline = time.monotonic() + 30
    while any(process_group_alive(pgid) for pgid in servers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(process_group_alive(pgid) for pgid in servers), "SGLang processes survived the job"
