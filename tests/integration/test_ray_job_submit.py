"""``ray job submit --working-dir .`` against a real Ray head on loopback, as on a cluster: a
relative ``run.output_dir`` is refused at once, with the fix in the message; with the fix (an
absolute directory through ``--set``) the job's driver joins the head's cluster (RAY_ADDRESS), runs
two RL steps, prints a line per step and writes its metrics there, W&B's offline files included.
``ray job stop`` stops a running job's driver, engines, trainer ranks and reward workers; the head
stays up."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import psutil
import pytest
import requests

from routing_replay.ports import free_port
from tests.integration.test_rl_job import job_config
from tests.integration.test_rl_shutdown import job_parts, long_job_file, survivors, wait_for_first_step

REPO = Path(__file__).parents[2]
BIN = Path(sys.executable).parent


class Head(NamedTuple):
    address: str
    """The dashboard's (job submission) address."""
    env: dict
    """The environment of a client: the head's auth token."""
    temp_dir: Path
    """The head's --temp-dir: its processes' command lines name it."""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    # Token authentication as a real cluster has it: head and client share a fresh token.
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    port, dashboard = free_port(), free_port()
    temp = tmp_path_factory.mktemp("ray-head")
    start = [str(BIN / "ray"), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--include-dashboard", "true",
             "--num-cpus", "2", "--object-store-memory", str(300 << 20), "--temp-dir", str(temp),
             # the agents' default ports may be held by the test session's own Ray
             "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
             "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]
    out = subprocess.run(start, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    yield Head(f"http://127.0.0.1:{dashboard}", env, temp)
    stop_processes_under(temp)


def stop_processes_under(temp_dir: Path) -> None:
    """Stops this head's processes only (their command lines name its temp dir). `ray stop` would
    stop every Ray on the machine, the test session's own included."""
    mine = [p for p in psutil.process_iter(["cmdline"]) if str(temp_dir) in " ".join(p.info["cmdline"] or [])]
    for process in mine:
        process.terminate()
    _, alive = psutil.wait_procs(mine, timeout=30)
    for process in alive:
        process.kill()


RELATIVE = "runs/submitted"


def submit(address: str, env: dict, entrypoint: str, runtime_env: dict | None = None,
           timeout: float = 540, options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``ray job submit [OPTIONS]`` of ``bash -c ENTRYPOINT`` with the repository as working directory."""
    submit = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), *options]
    if runtime_env:
        submit += ["--runtime-env-json", json.dumps(runtime_env)]
    submit += ["--", "bash", "-c", entrypoint]
    deadline = time.monotonic() + 120
    while True:  # a fresh head answers "no available agent" until its job agent is up: wait for that state
        out = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
        if out.returncode == 0 or "No available agent" not in out.stdout + out.stderr:
            return out
        assert time.monotonic() < deadline, "the head's job agent did not come up in 120 s"
        time.sleep(2)


def config_file(tmp_path: Path) -> Path:
    """The short job with a relative run.output_dir, as a repository's config would have it."""
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job_config(RELATIVE, steps=2).model_dump(mode="json")))  # JSON is YAML
    return path


@pytest.mark.timeout(300)
def test_a_relative_output_dir_is_refused_with_the_fix(ray_head, tmp_path):
    address, env, _ = ray_head
    train = [str(BIN / "routing-replay"), "train", "--config", str(config_file(tmp_path)), "--no-progress"]
    out = submit(address, env, f"exec {shlex.join(train)}", timeout=240)
    logs = out.stdout + out.stderr
    assert out.returncode != 0, logs[-4000:]
    assert f"run.output_dir='{RELATIVE}' is relative, and this driver runs under `ray job submit` (raysubmit_" in logs
    assert "--set run.output_dir=/shared/runs/submitted" in logs
    # the job's error (exit 1), raised in Job.__init__ before Ray, engines or trainers started
    assert f"routing-replay train: run.output_dir='{RELATIVE}' is relative" in logs


@pytest.mark.timeout(600)
def test_ray_job_submit_runs_the_job_on_the_cluster(ray_head, tmp_path):
    address, env, _ = ray_head
    run_dir = tmp_path / "run"  # absolute: as a directory on shared storage would be
    assert run_dir.is_absolute()
    # the fix the refusal names, and W&B offline (its files under the run directory, no network)
    train = [str(BIN / "routing-replay"), "train", "--config", str(config_file(tmp_path)), "--no-progress",
             "--set", f"run.output_dir={run_dir}", "--set", "run.wandb={project: routing-replay-tests, mode: offline}"]
    wandb_home = tmp_path / "wandb-home"
    runtime_env = {"env_vars": {"WANDB_SILENT": "true", "RUNTIME_ENV_MARK": "reached",
                                **{f"WANDB_{kind.upper()}_DIR": str(wandb_home / kind) for kind in ("config", "cache", "data")}}}
    # The job starts in the uploaded working directory: it must hold the code, not the virtual
    # environment or the build folder (both exist in the repository here; .gitignore excludes them).
    entrypoint = (f"test -e configs/tiny-moe-cpu.yaml && test ! -e .venv && test ! -e build && "
                  f"echo runtime env $RUNTIME_ENV_MARK && exec {shlex.join(train)}")
    out = submit(address, env, entrypoint, runtime_env)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "succeeded" in out.stdout
    assert "run finished" in out.stdout
    assert "step 2: reward " in out.stdout  # the console's line per step, in the job's logs
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2]
    run_id = (run_dir / "wandb-run-id").read_text().strip()
    assert list((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert "runtime env reached" in out.stdout  # the runtime environment's variables reached the driver


def head_process(head: Head, name: str) -> psutil.Process:
    """The head's process of the Ray executable ``name`` (raylet, gcs_server)."""
    for process in psutil.process_iter(["cmdline"]):
        command = " ".join(process.info["cmdline"] or [])
        if f"/{name} " in command and str(head.temp_dir) in command:
            return process
    raise AssertionError(f"the head has no {name} process")


def job_api(head: Head, submission_id: str, path: str = "") -> dict:
    """The dashboard's job REST API: the job's details, or ``path`` of it (``/logs``)."""
    response = requests.get(f"{head.address}/api/jobs/{submission_id}{path}", timeout=30,
                            headers={"Authorization": f"Bearer {head.env['RAY_AUTH_TOKEN']}"})
    response.raise_for_status()
    return response.json()


@pytest.mark.timeout(720)
def test_ray_job_stop_stops_engines_trainers_and_reward_workers(ray_head, tmp_path):
    """A submitted job, stopped by `ray job stop` once it completed a step: its driver, engine
    actors with their SGLang processes, trainer ranks and reward workers are gone; the head is up."""
    run_dir = tmp_path / "run"
    submission_id = f"raysubmit_stop_{secrets.token_hex(4)}"
    train = [str(BIN / "routing-replay"), "train", "--config", str(long_job_file(tmp_path, run_dir)), "--no-progress"]
    out = submit(ray_head.address, ray_head.env, f"exec {shlex.join(train)}",
                 options=("--no-wait", "--submission-id", submission_id))
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]

    def ended() -> str | None:
        if job_api(ray_head, submission_id)["status"] in ("PENDING", "RUNNING"):
            return None
        return job_api(ray_head, submission_id, "/logs")["logs"][-4000:]

    wait_for_first_step(run_dir, ended)
    raylet, gcs = head_process(ray_head, "raylet"), head_process(ray_head, "gcs_server")
    parts = job_parts(raylet.children(recursive=True))
    assert all(parts.values()), {part: len(found) for part, found in parts.items()}
    stop = subprocess.run([str(BIN / "ray"), "job", "stop", "--address", ray_head.address, submission_id],
                          env=ray_head.env, capture_output=True, text=True, timeout=120)
    assert stop.returncode == 0, stop.stdout + stop.stderr
    assert survivors([p for found in parts.values() for p in found], timeout=60) == [], "the job's processes survived"
    assert raylet.is_running() and gcs.is_running()
    assert job_api(ray_head, submission_id)["status"] == "STOPPED"  # the head still answers
