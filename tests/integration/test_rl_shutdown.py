"""Ctrl-C and SIGTERM stop the whole job: the driver (its own local Ray) exits with 130, and every
process it started is gone, its SGLang engines (server and children), trainer ranks and reward
workers among them. The job starts with --fresh over an earlier run's files: they are gone, and the
new run counts from step 0. This job syncs weights through safetensors on disk: its first step
completes only if the engine then scores the probe like the trainer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import psutil
import pytest

from tests.integration.test_rl_job import job_config

BIN = Path(sys.executable).parent

JOB_PARTS = {"job driver": "bin/routing-replay train", "engine actor": "ray::RolloutEngine",
             "trainer rank": "ray::TrainerRank", "reward worker": "ray::RewardWorker"}
"""A job's processes by a mark in their command line (a Ray actor's process title names its class)."""


def long_job_file(tmp_path: Path, run_dir: Path) -> Path:
    """A job of 1000 RL steps (no warm start, weights synced through disk) writing to ``run_dir``."""
    raw = job_config(run_dir, steps=1000).model_dump(mode="json")
    raw["task"]["sft_warmup_steps"] = 0
    raw["rollout"]["weight_sync"] = "disk"
    path = tmp_path / "long-job.yaml"
    path.write_text(json.dumps(raw))  # JSON is YAML
    return path


def steps_logged(run_dir: Path) -> list[int]:
    """The steps of the complete lines of ``run_dir/metrics.jsonl`` (none if there is no file)."""
    try:
        text = (run_dir / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line)["step"] for line in text.splitlines(keepends=True) if line.endswith("\n")]


def wait_for_first_step(run_dir: Path, ended: Callable[[], str | None], timeout: float = 420) -> None:
    """Polls until the job writing ``run_dir`` has logged RL step 1. ``ended()`` gives None while
    the job runs, else its output: a job that ended fails the wait at once, with that output."""
    deadline = time.monotonic() + timeout
    while 1 not in steps_logged(run_dir):
        output = ended()
        assert output is None, f"the job ended before completing a step:\n{output}"
        assert time.monotonic() < deadline, f"the job did not complete a step in {timeout:.0f} s"
        time.sleep(1)


def job_parts(processes: Iterable[psutil.Process]) -> dict[str, list[psutil.Process]]:
    """The job's driver, engine actors, trainer ranks and reward workers among ``processes``, and
    its SGLang processes (every process under an engine actor: servers, schedulers, ...)."""
    parts: dict[str, list[psutil.Process]] = {part: [] for part in [*JOB_PARTS, "SGLang process"]}
    for process in processes:
        try:
            command = " ".join(process.cmdline())
            part = next((part for part, mark in JOB_PARTS.items() if mark in command), None)
            if part == "engine actor":
                parts["SGLang process"] += process.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        if part is not None:
            parts[part].append(process)
    return parts


def survivors(processes: Iterable[psutil.Process], timeout: float) -> list[str]:
    """Waits up to ``timeout`` seconds for ``processes`` to exit; describes those still running."""
    _, alive = psutil.wait_procs(list(processes), timeout=timeout)
    described = []
    for process in alive:
        try:
            described.append(f"{process.pid}: {' '.join(process.cmdline())[:200]}")
        except psutil.NoSuchProcess:
            continue
    return described


def an_earlier_run(run_dir: Path) -> None:
    """Files as a run that reached step 7 leaves them: metrics, a checkpoint, logs."""
    (run_dir / "checkpoints" / "step-000007").mkdir(parents=True)
    (run_dir / "checkpoints" / "step-000007" / "state.json").write_text("{}")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 7, "reward/mean": 0.5}) + "\n")
    (run_dir / "logs").mkdir()
    (run_dir / "logs" / "earlier.log").write_text("an earlier run\n")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_every_process_of_the_job(tmp_path, stop):
    """SIGINT and SIGTERM, sent once the job has completed a step: exit 130 with the message, and
    every process the driver started is gone; --fresh had replaced the earlier run."""
    run_dir = tmp_path / "run"
    an_earlier_run(run_dir)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray
    log = tmp_path / "driver.log"
    train = [str(BIN / "routing-replay"), "train", "--config", str(long_job_file(tmp_path, run_dir)), "--fresh",
             "--no-progress"]
    with open(log, "w") as out:
        driver = subprocess.Popen(train, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_for_first_step(run_dir, lambda: None if driver.poll() is None else log.read_text()[-3000:])
        job = [psutil.Process(driver.pid), *psutil.Process(driver.pid).children(recursive=True)]
        parts = job_parts(job)
        assert all(parts.values()), {part: len(found) for part, found in parts.items()}
        driver.send_signal(stop)
        driver.wait(timeout=120)
    finally:
        if driver.poll() is None:
            driver.kill()
    output = log.read_text()
    assert driver.returncode == 130, output[-3000:]
    assert "routing-replay train: interrupted; every engine, trainer and worker was stopped" in output
    assert survivors(job, timeout=30) == [], "processes of the job survived it"
    # --fresh: the earlier run's files are gone, the new run counted from step 0
    assert steps_logged(run_dir)[0] == 1 and 7 not in steps_logged(run_dir)
    assert not (run_dir / "checkpoints" / "step-000007").exists()
    assert not (run_dir / "logs" / "earlier.log").exists()
