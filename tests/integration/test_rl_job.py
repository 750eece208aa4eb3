"""The RL job end to end on CPU, on the session's local Ray: real SGLang engine (--record-routing),
real megatron-core trainer rank with its collector thread, reward worker, weight sync.

The module shares one run directory and one live job (a start-up costs minutes on 2 cores), and
every test is independent of the others and of their order: the ``job`` fixture hands each test a
live job that sits at the run directory's last checkpoint, resuming a new one from that checkpoint
when an earlier test closed the shared job or left it broken. A test that breaks the job on purpose
closes it. The job samples at temperature 0.7 (the trainer must score at it too) and seeds SGLang.
Failures are triggered from observed state (a request in flight, a thread dead, a sync done), never
by a timer.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time

import pytest
import requests

from routing_replay import config, run_log
from routing_replay.orchestration import driver, engines

# Each test may include the job's first run and a resume (Ray actors, SGLang, megatron-core): minutes on 2 cores.
pytestmark = pytest.mark.timeout(600)

SHORT_JOB = {
    "model": {"tiny": "qwen3_moe", "rollout_dtype": "float32", "train_dtype": "float32"},
    "rollout": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 4, "sync_tolerance": 1e-4,
                "sglang_args": ["--skip-server-warmup", "--max-total-tokens", "4096"]},
    "train": {"steps": 2, "mini_batches": 2, "micro_batch_size": 4, "optimizer": {"learning_rate": 1e-3},
              "replay": "R3"},
    "task": {"name": "addition", "args": {"max_operand": 9}, "sft_warmup_steps": 20, "sft_learning_rate": 3e-3},
    "run": {"seed": 0, "checkpoint_every": 1},
}

TEMPERATURE = 0.7
"""This module's rollout temperature: not 1, so a trainer that ignored it would mismatch."""


def job_config(run_dir, **train) -> config.JobConfig:
    raw = json.loads(json.dumps(SHORT_JOB))
    raw["run"]["output_dir"] = str(run_dir)
    raw["train"].update(train)
    return config.JobConfig.model_validate(raw)


def module_config(run_dir, **train) -> config.JobConfig:
    """This module's job: ``job_config`` sampled at TEMPERATURE."""
    cfg = job_config(run_dir, **train)
    return cfg.model_copy(update={"rollout": cfg.rollout.model_copy(update={"temperature": TEMPERATURE})})


class SharedJob:
    """The module's run directory and its live job. Between tests the live job sits at the run
    directory's last checkpoint (a test that runs a step logs and checkpoints it)."""

    def __init__(self, run_dir) -> None:
        self.run_dir = run_dir
        self.job: driver.Job | None = None

    def live(self) -> driver.Job:
        """The shared job, or, if it was closed or a trainer rank cannot continue, a job resumed
        from the last checkpoint."""
        if self.job is not None and self.job.engines is not None:
            try:
                self.job._check_trainers()
            except driver.JobError:
                self.job.close()
        if self.job is None or self.job.engines is None:
            self.job = driver.Job(module_config(self.run_dir), driver.Options(resume=True, progress=False))
        return self.job

    def close(self) -> None:
        if self.job is not None:
            self.job.close()


@pytest.fixture(scope="module")
def shared(ray_local, tmp_path_factory):
    shared = SharedJob(tmp_path_factory.mktemp("rl-job"))
    yield shared
    shared.close()


@pytest.fixture(scope="module")
def short_run(shared) -> tuple[list[dict], list[str]]:
    """The module's job run once to train.steps (SFT warm start, two RL steps, a checkpoint each):
    its metrics records and checkpoint directories right after."""
    shared.job = driver.Job(module_config(shared.run_dir), driver.Options(progress=False))
    shared.job.run()
    return run_log.read(shared.run_dir), sorted(p.name for p in (shared.run_dir / "checkpoints").glob("step-*"))


@pytest.fixture
def job(shared, short_run) -> driver.Job:
    return shared.live()


def checkpointed_step(job: driver.Job) -> int:
    """The step of the run directory's last checkpoint: where the live job is."""
    return job.checkpoints.latest()[1].step


def on_rank(job: driver.Job, rank: int, fn):
    """``fn(trainer rank actor's instance)``, run inside trainer rank ``rank``."""
    return job._ray.get(job.trainers[rank].__ray_call__.remote(fn))


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


def kill_collector_thread(job: driver.Job) -> str | None:
    """Raises MemoryError inside trainer rank 0's routing collector thread (as a failed allocation
    there would); returns the thread's name once it has died, None if it survived."""

    def inject(rank) -> str | None:
        import ctypes

        name = f"routing-collector-{rank.collector.epoch}"
        thread = next(t for t in threading.enumerate() if t.name == name)
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(MemoryError))
        thread.join(10)
        return None if thread.is_alive() else name

    return on_rank(job, 0, inject)


def test_an_engine_that_did_not_deliver_routing_counts_as_crashed():
    """A response whose routing was not delivered raises EngineRoutingFailed (a crash: restarted)."""
    failed = {"meta_info": {"routing_replay": [{"delivery": "failed", "error": "background thread 'x' died"}]}}
    with pytest.raises(engines.EngineRoutingFailed,
                       match=r"engine 1, request 's1-p0-g0': routing was not delivered: background thread 'x' died"):
        engines.check_routing_delivered(1, "s1-p0-g0", failed)
    with pytest.raises(engines.EngineRoutingFailed, match="plugin is not active"):
        engines.check_routing_delivered(1, "s1-p0-g0", {"meta_info": {}})
    assert issubclass(engines.EngineRoutingFailed, engines.EngineCrashed)  # EnginePool restarts the engine
    queued = {"key": "s1-p0-g0", "rows": 3, "start": 0, "num_tokens": 4, "delivery": "queued", "sink": "tcp://x:1"}
    engines.check_routing_delivered(1, "s1-p0-g0", {"meta_info": {"routing_replay": [queued]}})
    with pytest.raises(engines.EngineRoutingFailed, match="not queued for its sink"):
        not_sent = {**queued, "delivery": "none"}
        engines.check_routing_delivered(1, "s1-p0-g0", {"meta_info": {"routing_replay": [not_sent]}})


def test_short_run_records_every_metric_with_full_replay(short_run, shared):
    """A run logs every metric of every step, finite; float32 on both sides: full replay coverage,
    no routing flips, no mismatch; a checkpoint per step; curves drawn."""
    records, checkpoints = short_run
    assert [r["step"] for r in records] == [0, 1, 2]  # SFT warm start, then two RL steps
    assert records[0]["sft/loss_last"] < records[0]["sft/loss_first"]
    for record in records[1:]:
        assert all(math.isfinite(v) for v in record.values())
        for name in ("reward/mean", "reward/std", "response_length/mean", "entropy", "mismatch/k3",
                     "mismatch/beyond_2", "mismatch/beyond_5", "routing/agreement/layer0", "routing/agreement/layer1",
                     "grad_norm/mb0", "grad_norm/mb1", "time/rollout", "time/routing_take", "time/old_logprob",
                     "time/update", "time/weight_sync", "throughput/tokens_per_s", "learning_rate/mb1",
                     "sync/probe_mean_abs_diff", "sync/probe_max_abs_diff"):
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
    assert checkpoints == ["step-000001", "step-000002"]
    assert run_log.plot(shared.run_dir)  # PNG curves of the run


def test_trainer_scores_rollouts_at_the_rollout_temperature(job, short_run):
    """At rollout temperature 0.7 the logged mismatch is float32 noise because the trainer scores
    at 0.7 too: the same rollout's tokens scored at temperature 1 differ from SGLang's log-probs."""
    assert job.cfg.rollout.temperature == TEMPERATURE
    assert all(r["mismatch/mean_abs"] < 1e-4 for r in short_run[0][1:])
    prompt = job._prompt_ids(job.prompts[0])
    params = {**job._sampling_params(), "max_new_tokens": 16, "ignore_eos": True}  # past the confident answer
    rollout = job.engines.call(0, "generate", [engines.RolloutRequest("temperature-probe", tuple(prompt), params)])[0]
    tokens = [*prompt, *rollout.response_ids]

    def mismatch(temperature: float) -> float:
        trainer = job._ray.get(job.trainers[0].score.remote(tokens, temperature))[len(prompt) - 1 :]
        return sum(abs(t - m) for t, m in zip(trainer, rollout.logprobs, strict=True)) / len(trainer)

    assert mismatch(TEMPERATURE) < 1e-4
    assert mismatch(1.0) > 1e-2


def test_engine_killed_mid_rollout_is_restarted_and_its_abandoned_routing_discarded(job, monkeypatch):
    """An engine killed mid-rollout is restarted and the step completes on resent requests; the
    trainer holds no routing of the abandoned attempt, and drops such routing arriving later."""
    step = checkpointed_step(job) + 1
    pid = job.engines.call(0, "server_pid")
    # Long responses (EOS ignored): SGLang reports a running request every 15 decode steps, and
    # the rest of the 96 tokens are still to come when the kill lands.
    params = {**job._sampling_params(), "max_new_tokens": 96, "ignore_eos": True}
    monkeypatch.setattr(job, "_sampling_params", lambda: params)
    generate, abandoned = job.engines.generate, []

    def generate_noting_abandoned(batch):
        results, keys = generate(batch)
        abandoned.extend(keys)
        return results, keys

    monkeypatch.setattr(job.engines, "generate", generate_noting_abandoned)
    killer = KillWhenGenerating(job.engines.call(0, "ready"), pid, timeout=240)
    killer.start()
    try:
        metrics = job.step(step)
    finally:
        killer.rollout_over.set()
        killer.join()
    assert killer.load_at_kill is not None, "the engine never reported a running request"
    assert killer.load_at_kill["num_running_reqs"] > 0  # killed mid-generation
    assert job.engines.restarts == 1 and metrics["engine/restarts"] == 1
    assert job.engines.call(0, "server_pid") != pid
    assert metrics["routing/coverage"] == 1.0 and metrics["routing/tokens_differing"] == 0
    assert metrics["response_length/mean"] == 96
    G = job.cfg.rollout.group_size
    n = job.cfg.rollout.prompts_per_step * G
    assert abandoned == [f"s{step}-p{i // G}-g{i % G}" for i in range(n)]  # one engine: its whole share resent
    assert on_rank(job, 0, lambda rank: rank.collector.held_keys()) == []

    # The abandoned attempt's routing arriving now (a real SGLang request under its key) is dropped.
    before = on_rank(job, 0, lambda rank: rank.collector.stats())
    late = engines.RolloutRequest(abandoned[0], tuple(job._prompt_ids(job.prompts[0])), {"max_new_tokens": 1},
                                  job.routing_sinks[0])
    job.engines.call(0, "generate", [late])
    deadline = time.monotonic() + 60
    while (after := on_rank(job, 0, lambda rank: rank.collector.stats())).messages == before.messages:
        assert time.monotonic() < deadline, "the late routing never reached the collector"
        time.sleep(0.1)
    assert (after.duplicates, after.received) == (before.duplicates + 1, before.received)
    assert on_rank(job, 0, lambda rank: rank.collector.held_keys()) == []
    job.run_log.log(step, metrics)
    job.checkpoint(step)


def test_a_dead_collector_thread_stops_the_job_at_once(job):
    """A trainer rank whose collector thread died stops the next step at once, naming rank, thread
    and cause."""
    try:
        thread = kill_collector_thread(job)
        assert thread is not None, "the collector thread survived the injected MemoryError"
        started = time.monotonic()
        with pytest.raises(driver.JobError) as stopped:
            job.step(checkpointed_step(job) + 1)
        assert time.monotonic() - started < 10  # the health check, not the routing timeout
    finally:
        job.close()
    message = str(stopped.value)
    assert message.startswith("trainer rank 0 cannot continue: ")
    assert f"background thread {thread!r} died: MemoryError" in message


def test_samples_of_a_stale_weight_version_are_refused(job):
    """Rollouts an engine sampled under another weight version than the job's stop the step, with
    both versions named (the engine's version is changed behind the driver's back)."""
    url = job.engines.call(0, "ready")

    def serve_as(version: str) -> None:
        answer = requests.post(f"{url}/update_weight_version", json={"new_version": version}, timeout=60).json()
        assert answer["success"], answer

    step = 1000 + checkpointed_step(job)  # a step number no test runs: its keys stay discarded below
    stale = f"step-{checkpointed_step(job) - 1}"
    serve_as(stale)
    try:
        expected = f"step {step}: engines sampled with weight version(s) {{'{stale}'}}, expected {job.version}"
        with pytest.raises(driver.JobError, match=re.escape(expected)):
            job.step(step)
    finally:  # the job back at its checkpoint: the engine's version, no routing of the refused samples held
        serve_as(job.version)
        G = job.cfg.rollout.group_size
        keys = [f"s{step}-p{i // G}-g{i % G}" for i in range(job.cfg.rollout.prompts_per_step * G)]
        job._on_trainers([t.discard_routing.remote(keys) for t in job.trainers])


def test_a_sync_whose_probe_differs_stops_the_job(job, monkeypatch):
    """The weight-sync probe catches an engine that does not serve the trainer's weights (it reloads
    the initial model after the sync, before the probe) with WeightSyncError; a sync that lands passes."""
    probe = job._prompt_ids(job.prompts[0])
    score = job.engines.score

    def reload_initial_model_then_score(token_ids, temperature=1.0):
        job.engines.call(0, "update_weights", job.model_path, job.version)
        return score(token_ids, temperature)

    with monkeypatch.context() as patch:
        patch.setattr(job.engines, "score", reload_initial_model_then_score)
        with pytest.raises(driver.WeightSyncError, match=rf"after syncing {job.version}, an engine's log-probs differ "
                                                         r"from the trainer's by \S+ per probe token > "
                                                         r"rollout.sync_tolerance=0.0001"):
            job._sync_weights(job.version, probe)
    assert job._sync_weights(job.version, probe)["sync/probe_mean_abs_diff"] < 1e-4


def test_resume_continues_from_the_last_checkpoint_and_drops_later_metrics(shared, job):
    """A resumed job restores the last checkpoint bit-exactly (trainer state, weights the engine
    serves), drops the metrics logged after it (metrics.jsonl and TensorBoard) and continues the
    curves from it; it refuses another configuration. The resumed job stays the shared one."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, checkpointed = shared.run_dir, checkpointed_step(job)
    probe = job.tokenizer("What is 3 + 4? The answer is 7").input_ids
    before = job.trainer_logprobs(probe)
    state = job._ray.get([t.state_digest.remote() for t in job.trainers])
    job.run_log.log(checkpointed + 1, job.step(checkpointed + 1))  # logged, never checkpointed
    job.close()
    with pytest.raises(driver.JobError, match="already holds a run"):
        driver.Job(module_config(run_dir), driver.Options(progress=False))
    resumed = shared.job = driver.Job(module_config(run_dir, steps=checkpointed + 1),
                                      driver.Options(resume=True, progress=False))
    assert resumed.start_step == checkpointed and resumed.version == f"step-{checkpointed}"
    assert [r["step"] for r in run_log.read(run_dir)] == list(range(checkpointed + 1))  # the later step dropped
    # New trainer processes: weights, fp32 main params, Adam moments and steps restored bit-exactly.
    assert resumed._ray.get([t.state_digest.remote() for t in resumed.trainers]) == state
    after = resumed.trainer_logprobs(probe)
    assert after == before
    assert resumed.engines.score(probe)[0] == pytest.approx(after, abs=1e-4)  # and served by the engine
    resumed.run()
    records = run_log.read(run_dir)
    assert [r["step"] for r in records] == list(range(checkpointed + 2))
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("time/step")]  # once per step: the dropped one purged
    assert logged == [(r["step"], pytest.approx(r["time/step"], rel=1e-6)) for r in records if "time/step" in r]
    with pytest.raises(driver.JobError, match="another configuration"):
        driver.Job(module_config(run_dir, steps=checkpointed + 2, optimizer={"learning_rate": 1.0}),
                   driver.Options(resume=True, progress=False))
