"""The RL job end to end on CPU, on the session's local Ray: real SGLang engine (--record-routing),
real megatron-core trainer rank with its collector thread, reward worker, weight sync.

One job is shared by the tests in file order: a short run (R3, two mini-batches, checkpoints), an
engine killed mid-rollout, a trainer rank's collector thread killed (the job stops at once), then a
resume from the last checkpoint that continues the curves. Failures are triggered from observed
state (a request in flight, a thread dead), never by a timer.
"""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import pytest
import requests

from routing_replay import config, run_log
from routing_replay.orchestration import driver, engines

# Each test may include the job's start-up (Ray actors, SGLang, megatron-core): minutes on 2 cores.
pytestmark = pytest.mark.timeout(480)

SHORT_JOB = {
    "model": {"tiny": "qwen3_moe", "rollout_dtype": "float32", "train_dtype": "float32"},
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "sync_tolerance": 1e-4,
                "sglang_args": ["--skip-server-warmup", "--max-total-tokens", "4096"]},
    "train": {"steps": 2, "mini_batches": 2, "micro_batch_size": 4, "learning_rate": 1e-3, "replay": "R3"},
    "task": {"name": "addition", "args": {"max_operand": 9}, "sft_warmup_steps": 20, "sft_learning_rate": 3e-3},
    "run": {"seed": 0, "checkpoint_every": 1},
}


def job_config(run_dir, **train) -> config.JobConfig:
    raw = json.loads(json.dumps(SHORT_JOB))
    raw["run"]["output_dir"] = str(run_dir)
    raw["train"].update(train)
    return config.JobConfig.model_validate(raw)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("rl-job")


@pytest.fixture(scope="module")
def job(ray_local, run_dir):
    job = driver.Job(job_config(run_dir), driver.Options(progress=False))
    yield job
    job.close()


class KillWhenGenerating(threading.Thread):
    """Kills an engine's SGLang server (its process group) as soon as the server reports a
    generation request running, so the kill lands mid-rollout however slow the machine is. Gives
    up at the deadline or when told the rollout is over."""

    def __init__(self, url: str, pgid: int, timeout: float) -> None:
        super().__init__(name="kill-when-generating", daemon=True)
        self.url, self.pgid, self.timeout = url, pgid, timeout
        self.rollout_over = threading.Event()
        self.load_at_kill: dict | None = None
        """The server's load report (SGLang's /v1/loads, core fields) that triggered the kill."""

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline and not self.rollout_over.wait(0.05):
            load = requests.get(f"{self.url}/v1/loads", params={"include": "core"}, timeout=10).json()["loads"][0]
            if load["num_running_reqs"] > 0:
                os.killpg(self.pgid, signal.SIGKILL)
                self.load_at_kill = load
                return


def kill_collector_thread(trainer) -> str | None:
    """Raises MemoryError inside a trainer rank's routing collector thread (as a failed allocation
    there would); returns the thread's name once it has died, None if it survived."""

    def inject(rank) -> str | None:
        import ctypes

        name = f"routing-collector-{rank.collector.epoch}"
        thread = next(t for t in threading.enumerate() if t.name == name)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(MemoryError))
        thread.join(10)
        return None if thread.is_alive() else name

    import ray

    return ray.get(trainer.__ray_call__.remote(inject))


def test_an_engine_that_did_not_deliver_routing_counts_as_crashed():
    failed = {"meta_info": {"routing_replay": [{"delivery": "failed", "error": "background thread 'x' died"}]}}
    with pytest.raises(engines.EngineRoutingFailed,
                       match=r"engine 1, request 's1-p0-g0': routing was not delivered: background thread 'x' died"):
        engines.check_routing_delivered(1, "s1-p0-g0", failed)
    with pytest.raises(engines.EngineRoutingFailed, match="plugin is not active"):
        engines.check_routing_delivered(1, "s1-p0-g0", {"meta_info": {}})
    assert issubclass(engines.EngineRoutingFailed, engines.EngineCrashed)  # EnginePool restarts the engine
    engines.check_routing_delivered(1, "s1-p0-g0", {"meta_info": {"routing_replay": [{"delivery": "queued"}]}})


def test_short_run_records_every_metric_with_full_replay(job, run_dir):
    job.run()
    records = run_log.read(run_dir)
    assert [r["step"] for r in records] == [0, 1, 2]  # SFT warm start, then two RL steps
    assert records[0]["sft/loss_last"] < records[0]["sft/loss_first"]
    for record in records[1:]:
        assert all(math.isfinite(v) for v in record.values())
        for name in ("reward/mean", "reward/std", "response_length/mean", "entropy", "mismatch/k3",
                     "mismatch/beyond_2", "mismatch/beyond_5", "routing/agreement/layer0", "routing/agreement/layer1",
                     "grad_norm/mb0", "grad_norm/mb1", "time/rollout", "time/routing_take", "time/old_logprob",
                     "time/update", "time/weight_sync", "throughput/tokens_per_s", "learning_rate/mb1"):
            assert name in record, name
        assert record["optimizer/skipped_steps"] == 0 and record["learning_rate/mb0"] == 1e-3  # constant schedule
        for mb in ("mb0", "mb1"):  # both factors and the clip and correction statistics per mini-batch index
            for name in ("mismatch/{}/mean_abs", "staleness/{}/mean_abs", "staleness/{}/k3", "staleness/{}/p99",
                         "staleness/{}/outside_clip", "ratio/{}/k3", "clip_fraction/{}", "correction/{}/weight_mean",
                         "loss/{}", "replay/agreement/{}"):
                assert name.format(mb) in record
        # paired on the same tokens: the trainer's own routing and the rollout's
        for name in ("paired/own/k3", "paired/rollout/k3", "paired/own/p99", "paired/flip_share",
                     "paired/flip_share/layer0", "paired/tokens_flipped_share", "paired/rollout/unflipped/k3"):
            assert name in record, name
        assert record["paired/flip_share"] == 0  # float32 on both sides: no routing flips...
        assert record["paired/own/mean_abs"] < 1e-4 and record["paired/rollout/mean_abs"] < 1e-4  # ...no mismatch
        assert record["replay/agreement/mb0"] == 1.0  # mini-batch 0 replays what the model chooses itself
        assert record["routing/missing"] == 0
        assert record["routing/coverage"] == 1.0  # every loss-relevant token replayed, in every layer
        assert record["routing/tokens_differing"] == 0  # float32 on both sides: the trainer routes as SGLang did
        assert record["mismatch/mean_abs"] < 1e-4
        assert record["staleness/mb0/mean_abs"] < 1e-4  # the first mini-batch is on-policy
        assert record["sync/probe_max_abs_diff"] <= 1e-4
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    assert checkpoints == ["step-000001", "step-000002"]
    assert run_log.plot(run_dir)  # PNG curves of the run


def test_engine_killed_mid_rollout_is_restarted_and_the_step_completes(job, monkeypatch):
    pid = job.engines.call(0, "server_pid")
    # Long responses (EOS ignored): SGLang reports a running request every 15 decode steps, and
    # the rest of the 96 tokens are still to come when the kill lands.
    monkeypatch.setattr(job, "_sampling_params", lambda: {"max_new_tokens": 96, "temperature": 1.0,
                                                          "ignore_eos": True})
    killer = KillWhenGenerating(job.engines.call(0, "ready"), pid, timeout=240)
    killer.start()
    started = time.monotonic()
    try:
        metrics = job.step(3)
    finally:
        killer.rollout_over.set()
        killer.join()
    assert killer.load_at_kill is not None, "the engine never reported a running request"
    assert killer.load_at_kill["num_running_reqs"] > 0  # killed mid-generation
    assert job.engines.restarts == 1 and metrics["engine/restarts"] == 1
    assert job.engines.call(0, "server_pid") != pid
    assert metrics["time/rollout"] < time.monotonic() - started
    assert metrics["routing/coverage"] == 1.0 and metrics["routing/tokens_differing"] == 0
    assert metrics["response_length/mean"] == 96
    job.run_log.log(3, metrics)
    job.checkpoint(3)


def test_a_dead_collector_thread_stops_the_job_at_once(job):
    thread = kill_collector_thread(job.trainers[0])
    assert thread is not None, "the collector thread survived the injected MemoryError"
    started = time.monotonic()
    with pytest.raises(driver.JobError) as stopped:
        job.step(4)
    assert time.monotonic() - started < 10  # the health check, not the routing timeout
    message = str(stopped.value)
    assert message.startswith("trainer rank 0 cannot continue: ")
    assert f"background thread {thread!r} died: MemoryError" in message


def test_resume_continues_from_the_last_checkpoint(job, run_dir):
    probe = job.tokenizer("What is 3 + 4? The answer is 7").input_ids
    before = job.trainer_logprobs(probe)
    state = job._ray.get([t.state_digest.remote() for t in job.trainers])  # as of the step-3 checkpoint
    job.close()
    with pytest.raises(driver.JobError, match="already holds a run"):
        driver.Job(job_config(run_dir, steps=4), driver.Options(progress=False))
    resumed = driver.Job(job_config(run_dir, steps=4), driver.Options(resume=True, progress=False))
    try:
        assert resumed.start_step == 3 and resumed.version == "step-3"
        # New trainer processes: weights, fp32 main params, Adam moments and steps restored bit-exactly.
        assert resumed._ray.get([t.state_digest.remote() for t in resumed.trainers]) == state
        after = resumed.trainer_logprobs(probe)
        assert after == before
        assert resumed.engines.score(probe)[0] == pytest.approx(after, abs=1e-4)  # and served by the engine
        resumed.run()
    finally:
        resumed.close()
    assert [r["step"] for r in run_log.read(run_dir)] == [0, 1, 2, 3, 4]
    with pytest.raises(driver.JobError, match="another configuration"):
        driver.Job(job_config(run_dir, steps=5, learning_rate=1.0), driver.Options(resume=True, progress=False))
