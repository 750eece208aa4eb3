"""The RL job's driver: sets up the Ray actors, then loops over the step's phases.

``Job.step`` is the whole algorithm on one screen: sample prompts (each sample's data-parallel
rank is chosen here, so SGLang sends its routing straight to that rank's collector), roll out G
responses per prompt, reward, group-normalise, pi_old, N mini-batch updates, weight sync, and a
probe that proves the engines serve the trainer's weights. Everything else is set-up and
bookkeeping: checkpoints, resume, metrics and clean shutdown.

Failures: a crashed engine is restarted by ``EnginePool``; an engine that keeps failing, or a
trainer rank whose routing collector thread died, stops the job with a ``JobError`` that says so.
"""

from __future__ import annotations

import hashlib
import logging
import random
import shutil
import signal
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from routing_replay import config as job_config
from routing_replay.orchestration.cluster import connect, output_dir_problem  # first: configures Ray before its import
from routing_replay.orchestration import checkpoints as ckpt
from routing_replay.orchestration.engines import (
    EnginePool,
    EngineRestartsExhausted,
    EngineSpec,
    RolloutRequest,
    remote_cause,
)
from routing_replay.orchestration.placement import Layout, Placement
from routing_replay.orchestration.rewards import RewardWorker, score_all
from routing_replay.orchestration.trainer import ReplayCoverageError, StaleRoutingError, TrainerRank, TrainerSpec
from routing_replay.orchestration.trainer_settings import TrainerSettings
from routing_replay.rl.advantages import group_normalized
from routing_replay.rl.rollout_batch import Sample, split
from routing_replay.rl.step_stats import merged, paired_ratios
from routing_replay.wire import RoutingDeliveryFailed
from routing_replay.wire.worker import BackgroundThreadDied

log = logging.getLogger(__name__)


class JobError(RuntimeError):
    """The job cannot start or continue; the message says why."""


class WeightSyncError(JobError):
    """After a weight sync the engines' log-probs differ from the trainer's."""


@dataclass(frozen=True)
class Options:
    resume: bool = False
    """Continue from the run directory's latest checkpoint."""
    fresh: bool = False
    """Delete the run directory first."""
    progress: bool = True


class Job:
    def __init__(self, cfg: job_config.JobConfig, options: Options = Options()) -> None:
        import ray
        from transformers import AutoTokenizer

        from routing_replay.run_log import MetricsLogError, RunLog
        from routing_replay.tasks import check_chat_template, load_prompts

        problems = job_config.validate_job(cfg, job_config.architecture_of(cfg))
        if problems:
            raise JobError("the configuration cannot run: " + "; ".join(problems))
        if problem := output_dir_problem(cfg.run.output_dir):  # before anything is deleted or started
            raise JobError(problem)
        self.cfg, self.options = cfg, options
        self.run_dir = Path(cfg.run.output_dir)
        self.engines = None
        self.placement: Placement | None = None
        self.trainers: list = []
        self.rewarders: list = []
        self.checkpoints = ckpt.Checkpoints(self.run_dir, cfg.run.keep_checkpoints)
        self.digest = _digest(cfg)
        resumed = self._prepare_run_dir()
        self._started_ray = _connect_keeping_sigterm_handler(cfg)
        try:
            self.model_path = self._initial_model()
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path)
            t = cfg.task
            self.prompts = load_prompts(t.name, t.prompts, cfg.run.seed, args=t.args, prompt_key=t.prompt_key,
                                        answer_key=t.answer_key, metadata_keys=t.metadata_keys, chat=t.chat)
            check_chat_template(self.tokenizer, t.chat, self.prompts, f"the tokenizer of {self.model_path}")
            self.start_step = resumed[1].step if resumed else 0
            self.weights = str(resumed[0] / "hf") if resumed else self.model_path
            self.version = f"step-{self.start_step}" if resumed else "init"
            self._start_actors(ray, resumed[0] if resumed else None)
            try:
                self.run_log = RunLog(self.run_dir, purge_step=self.start_step + 1, wandb=cfg.run.wandb,
                                      config=cfg.model_dump(mode="json"))
            except MetricsLogError as exc:
                raise JobError(str(exc)) from None
            if not resumed and cfg.task.sft_warmup_steps:
                self._warm_start()
        except BaseException:
            self.close()
            raise

    # ---- the step ------------------------------------------------------------------------------

    def step(self, step: int) -> dict[str, float]:
        cfg, G = self.cfg, self.cfg.rollout.group_size
        self._check_trainers()
        times, started = {}, time.perf_counter()
        records = random.Random(f"{cfg.run.seed}-prompts-{step}").sample(self.prompts, cfg.rollout.prompts_per_step)
        n, ranks = len(records) * G, len(self.trainers)
        order = random.Random(f"{cfg.run.seed}-order-{step}").sample(range(n), n)  # -> data-parallel shares
        rank_of = {i: position * ranks // n for position, i in enumerate(order)}
        prompt_ids = [tuple(self._prompt_ids(r)) for r in records]
        requests = [RolloutRequest(f"s{step}-p{i // G}-g{i % G}", prompt_ids[i // G], self._sampling_params(),
                                   self.routing_sinks[rank_of[i]] if _records_routing(cfg) else None)
                    for i in range(n)]
        try:
            results, abandoned = self.engines.generate(requests)
        except EngineRestartsExhausted as exc:
            raise JobError(f"step {step}: {exc}") from exc
        if abandoned:
            self._on_trainers([t.discard_routing.remote(abandoned) for t in self.trainers])
        stale = {r.weight_version for r in results} - {self.version}
        if stale:
            raise JobError(f"step {step}: engines sampled with weight version(s) {stale}, expected {self.version}")
        times["time/rollout"] = time.perf_counter() - started
        reward_started = time.perf_counter()
        texts = self.tokenizer.batch_decode([r.response_ids for r in results], skip_special_tokens=True)
        rewards = torch.tensor(score_all(self.rewarders, [records[i // G] for i in range(n)], texts))
        times["time/reward"] = time.perf_counter() - reward_started
        advantages = group_normalized(rewards, G)
        samples = [Sample(r.key, prompt_ids[i // G], r.response_ids, r.logprobs, float(rewards[i]), float(advantages[i]))
                   for i, r in enumerate(results)]
        shares = [[samples[order[p]] for p in positions] for positions in split(n, ranks)]
        old = merged(self._on_trainers([t.old_logprobs.remote(s, self.version)  # refuses routing of other weights
                                        for t, s in zip(self.trainers, shares)]))
        update = merged(self._on_trainers([t.update.remote(s) for t, s in zip(self.trainers, shares)]))
        trained = {**old.flat(), **update.flat()}
        trained.update(paired_ratios(trained))
        sync_started = time.perf_counter()
        probe = self._sync_weights(f"step-{step}", samples[0].token_ids)
        times["time/weight_sync"] = time.perf_counter() - sync_started
        times["time/step"] = time.perf_counter() - started
        tokens = sum(len(s.token_ids) for s in samples)
        return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std(unbiased=False)),
                "response_length/mean": sum(len(s.response_ids) for s in samples) / n, **trained, **times,
                "throughput/tokens_per_s": tokens / times["time/step"], **probe,
                "engine/restarts": float(self.engines.restarts)}

    def _check_trainers(self) -> None:
        """Stops the job if a trainer rank's collector thread died: the routing of a rollout
        could not reach it (cheap: one call per rank)."""
        self._on_trainers([t.health.remote() for t in self.trainers])

    def _on_trainers(self, futures: list) -> list:
        """The results of one call per trainer rank, in rank order, each handled as it arrives: a
        rank whose background thread died stops the job at once, naming the rank, the thread and
        its cause (the other ranks may be blocked in a collective, waiting for that rank)."""
        results: list = [None] * len(futures)
        pending = {future: rank for rank, future in enumerate(futures)}
        while pending:
            ready, _ = self._ray.wait(list(pending), num_returns=1)
            rank = pending.pop(ready[0])
            try:
                results[rank] = self._ray.get(ready[0])
            except (BackgroundThreadDied, ReplayCoverageError, RoutingDeliveryFailed,
                    StaleRoutingError) as exc:  # a RayTaskError that is one
                raise JobError(f"trainer rank {rank} cannot continue: {remote_cause(exc)}") from exc
        return results

    def run(self) -> Path:
        from tqdm import tqdm

        from routing_replay.run_log import summary_line

        steps = range(self.start_step + 1, self.cfg.train.steps + 1)
        bar = tqdm(steps, desc="RL", unit="step", disable=not self.options.progress, initial=self.start_step,
                   total=self.cfg.train.steps)
        every = self.cfg.run.checkpoint_every
        for step in bar:
            metrics = self.step(step)
            self.run_log.log(step, metrics)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", mismatch=f"{metrics['mismatch/mean_abs']:.2e}")
            line = summary_line(step, metrics, self.cfg.train.mini_batches)
            if self.options.progress:
                tqdm.write(line)  # above the bar, which stays last
            else:
                log.info(line)
            if every and (step % every == 0 or step == self.cfg.train.steps):
                self.checkpoint(step)
        return self.run_dir

    # ---- set-up ----------------------------------------------------------------------------------

    def _prepare_run_dir(self) -> tuple[Path, ckpt.RunState] | None:
        if self.options.fresh:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.options.resume:
            latest = self.checkpoints.latest()
            if latest is None:
                raise JobError(f"--resume: {self.run_dir} has no checkpoint (set run.checkpoint_every)")
            if latest[1].config_digest != self.digest:
                raise JobError(f"--resume: {latest[0]} was written under another configuration (only train.steps, "
                               "train.parallel.data, run.checkpoint_every and run.output_dir may change when resuming)")
            _truncate_metrics(self.run_dir, latest[1].step)
            return latest
        if (self.run_dir / "metrics.jsonl").exists():
            raise JobError(f"{self.run_dir} already holds a run: pass --resume to continue it or --fresh to replace it")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        return None

    def _initial_model(self) -> str:
        if self.cfg.model.path is not None:
            return self.cfg.model.path
        from routing_replay.tiny_models import build_from_config

        path = self.run_dir / "initial-model"
        if not (path / "config.json").exists():
            build_from_config(self.cfg.model.tiny, path, seed=self.cfg.run.seed)
        return str(path)

    def _start_actors(self, ray, resume_dir: Path | None) -> None:
        cfg = self.cfg
        self._ray = ray
        gpu = 1 if cfg.run.gpus else 0
        world = cfg.train.parallel.data * cfg.train.parallel.tensor * cfg.train.parallel.context
        self.placement = Placement(Layout(world, cfg.train.parallel.expert, cfg.rollout.engines,
                                          cfg.rollout.gpus_per_engine if gpu else 0, gpus=bool(gpu),
                                          strategy=cfg.run.placement))
        trainer_actor = ray.remote(num_cpus=0, num_gpus=gpu)(TrainerRank)
        self.trainers = [trainer_actor.options(scheduling_strategy=self.placement.trainer(r)).remote()
                         for r in range(world)]
        address, port = ray.get(self.trainers[0].endpoint.remote())
        bind = "tcp://127.0.0.1:*" if address == "127.0.0.1" else f"tcp://{address}:*"
        specs = [trainer_spec(cfg, rank=r, world_size=world, master_port=port, model_path=self.model_path,
                              routing_bind=bind) for r in range(world)]
        resume = str(resume_dir) if resume_dir else None
        self.routing_sinks = ray.get([t.setup.remote(s, address, resume) for t, s in zip(self.trainers, specs)])
        engine_specs = [EngineSpec(i, self.weights, str(self.run_dir / "logs"), tuple(cfg.rollout.sglang_args),
                                   cfg.model.rollout_dtype, record_routing=_records_routing(cfg),
                                   weight_version=self.version, gpus=cfg.rollout.gpus_per_engine if cfg.run.gpus else 0,
                                   tp_size=_tp_size(cfg.rollout.sglang_args), seed=cfg.run.seed + i)
                        for i in range(cfg.rollout.engines)]
        distributed = cfg.rollout.weight_sync == "distributed"
        self.engines = EnginePool(engine_specs, max_restarts=cfg.run.max_engine_restarts,
                                  on_restart=self._rejoin_weight_group if distributed else None,
                                  before_restart=self._check_trainers, placement=self.placement.engine)
        if distributed:
            self.weight_meta = ray.get([t.weight_metadata.remote() for t in self.trainers])[0]
            self._form_weight_group()
        reward_actor = ray.remote(num_cpus=0)(RewardWorker)
        self.rewarders = [reward_actor.remote(cfg.task.reward) for _ in range(cfg.task.reward_workers)]

    def _warm_start(self) -> None:
        """Supervised batches on (prompt, " " + answer + EOS) from the task's prompts (cold start)."""
        from tqdm import tqdm

        cfg, rng = self.cfg.task, random.Random(f"{self.cfg.run.seed}-sft")
        eos = self.tokenizer.eos_token_id
        started, losses = time.perf_counter(), []
        bar = tqdm(total=cfg.sft_warmup_steps, desc="SFT warm start", unit="batch", disable=not self.options.progress)
        for chunk in split_count(cfg.sft_warmup_steps, 10):
            batches = [[(self._prompt_ids(r), self.tokenizer(" " + str(r["answer"])).input_ids + [eos])
                        for r in rng.sample(self.prompts, cfg.sft_batch_size)] for _ in range(chunk)]
            shares = [[batch[i :: len(self.trainers)] for batch in batches] for i in range(len(self.trainers))]
            losses += self._ray.get([t.sft.remote(s, cfg.sft_learning_rate)
                                     for t, s in zip(self.trainers, shares)])[0]
            bar.update(chunk)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
        bar.close()
        probe = self._prompt_ids(self.prompts[0])
        self._sync_weights("sft", probe)
        self.run_log.log(0, {"sft/loss_first": losses[0], "sft/loss_last": losses[-1],
                             "time/sft": time.perf_counter() - started})

    def _prompt_ids(self, record: dict) -> list[int]:
        """A prompt's token ids (task.chat: through the tokenizer's chat template)."""
        from routing_replay.tasks import prompt_token_ids

        return prompt_token_ids(self.tokenizer, record, self.cfg.task.chat)

    def _sampling_params(self) -> dict:
        r = self.cfg.rollout
        return {"max_new_tokens": r.max_new_tokens, "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k}

    # ---- weights and checkpoints -----------------------------------------------------------------

    def _sync_weights(self, version: str, probe: list[int]) -> dict[str, float]:
        """Trainer -> every engine (prefix caches flushed, tagged ``version``), then the probe check:
        each engine's mean |log-prob difference| per probe token must stay within
        ``rollout.sync_tolerance``. The mean, not the max: with a bfloat16 engine one token whose
        routing flips can differ by nats, while an engine on other weights differs on every token."""
        self._push_weights(version)
        self.version = version
        trainer = torch.tensor(self.trainer_logprobs(probe))
        differences = [(torch.tensor(engine) - trainer).abs() for engine in self.engines.score(probe)]
        mean = max(float(d.mean()) for d in differences)
        if mean > self.cfg.rollout.sync_tolerance:
            raise WeightSyncError(f"after syncing {version}, an engine's log-probs differ from the trainer's by "
                                  f"{mean:.3g} per probe token > rollout.sync_tolerance={self.cfg.rollout.sync_tolerance}")
        return {"sync/probe_mean_abs_diff": mean, "sync/probe_max_abs_diff": max(float(d.max()) for d in differences)}

    def _push_weights(self, version: str) -> None:
        if self.cfg.rollout.weight_sync == "distributed":
            self._ray.get([t.broadcast_weights.remote(self.weight_meta) for t in self.trainers]
                          + self.engines.call_all("receive_weights", self.weight_meta, self.weight_group.name, version))
            return
        path = self.run_dir / "weights" / version
        self._ray.get([t.export_weights.remote(str(path)) for t in self.trainers])
        self.engines.update_weights(str(path), version)
        previous, self.weights = self.weights, str(path)
        if Path(previous).parent == path.parent:
            shutil.rmtree(previous, ignore_errors=True)

    def _form_weight_group(self) -> None:
        """Trainer rank 0 and every engine rank meet in a fresh broadcast group."""
        from routing_replay.orchestration.weight_sync import WeightGroup

        previous = getattr(self, "weight_group", None)
        if previous is not None:  # engines that survived a restart leave the old group
            for future in self.engines.call_all("leave_weight_group", previous.name):
                try:
                    self._ray.get(future)
                except Exception:  # noqa: BLE001 - a restarted engine was never in it
                    pass
        address, port = self._ray.get(self.trainers[0].endpoint.remote())
        serial = int(previous.name.rsplit("-", 1)[1]) + 1 if previous else 0
        group = WeightGroup(address, port, 1 + sum(s.tp_size for s in self.engines.specs),
                            f"routing-replay-weights-{serial}", "nccl" if self.cfg.run.gpus else "gloo")
        joins = [e.join_weight_group.remote(group, offset)
                 for e, offset in zip(self.engines.engines, self.engines.rank_offsets())]
        self._ray.get([self.trainers[0].open_weight_group.remote(group), *joins])
        self.weight_group = group

    def _rejoin_weight_group(self) -> None:
        """After an engine restart (it serves the initial weights): a new group, the current weights."""
        self._form_weight_group()
        self._push_weights(self.version)

    def trainer_logprobs(self, token_ids: list[int]) -> list[float]:
        """The trainer's log-prob of every token after the first (every rank takes part: with expert
        parallelism a forward is collective)."""
        return self._ray.get([t.score.remote(token_ids) for t in self.trainers])[0]

    def checkpoint(self, step: int) -> Path:
        staged = self.checkpoints.staging(step)
        self._ray.get([t.save_checkpoint.remote(str(staged)) for t in self.trainers]
                      + [t.export_weights.remote(str(staged / "hf")) for t in self.trainers])
        return self.checkpoints.commit(staged, ckpt.RunState(step, self.cfg.run.seed, self.digest,
                                                             prompts_drawn=step * self.cfg.rollout.prompts_per_step))

    # ---- shutdown ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Stops every engine (and its SGLang processes), trainer and reward worker; idempotent."""
        import ray

        if getattr(self, "run_log", None) is not None:
            self.run_log.close()
            self.run_log = None
        if self.engines is not None:
            self.engines.stop()
            self.engines = None
        for actor in self.trainers:
            try:
                ray.get(actor.close.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - a dead or never set-up actor is killed regardless
                pass
        for actor in [*self.trainers, *self.rewarders]:
            ray.kill(actor, no_restart=True)
        self.trainers, self.rewarders = [], []
        if self.placement is not None:
            self.placement.release()
            self.placement = None
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    def __enter__(self) -> Job:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def train(cfg: job_config.JobConfig, options: Options = Options()) -> Path:
    """Runs the job to ``train.steps``; SIGTERM and Ctrl-C stop every process before returning."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        with Job(cfg, options) as job:
            return job.run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _connect_keeping_sigterm_handler(cfg: job_config.JobConfig) -> bool:
    """``connect``, then the SIGTERM handler set before it (``train``'s) again: ray.init replaces it
    with its own, which exits (or aborts, in Ray's C++ crash handler) without stopping the job."""
    handler = signal.getsignal(signal.SIGTERM)
    started = connect(cfg)
    if callable(handler) and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)
    return started


def _tp_size(sglang_args: list[str]) -> int:
    """SGLang's tensor-parallel size from its arguments (``--tp-size N``, ``--tp N``, ``--tp-size=N``)."""
    for i, arg in enumerate(sglang_args):
        name, _, value = arg.partition("=")
        if name in ("--tp-size", "--tp"):
            return int(value or sglang_args[i + 1])
    return 1


def split_count(total: int, chunk: int) -> list[int]:
    return [min(chunk, total - start) for start in range(0, total, chunk)]


def trainer_spec(cfg: job_config.JobConfig, *, rank: int, world_size: int, master_port: int, model_path: str,
                 routing_bind: str) -> TrainerSpec:
    """A trainer rank's spec: the job's ``train`` section as it is (its ``TrainerSettings``), the
    other sections' values the rank needs, and the rank's place in the job."""
    settings = {field.name: getattr(cfg.train, field.name) for field in fields(TrainerSettings)}
    return TrainerSpec(**settings, rank=rank, world_size=world_size, master_port=master_port, model_path=model_path,
                       routing_bind=routing_bind, temperature=cfg.rollout.temperature,
                       train_dtype=cfg.model.train_dtype, seed=cfg.run.seed)


def _records_routing(cfg: job_config.JobConfig) -> bool:
    """SGLang records and sends routing for R3's replay and for the paired diagnostics."""
    return cfg.train.replay == "R3" or cfg.train.paired_diagnostics


def _digest(cfg: job_config.JobConfig) -> str:
    frozen = cfg.model_dump(mode="json")
    frozen["train"].pop("steps")
    frozen["train"]["parallel"].pop("data")  # megatron-core's checkpoints load at another data-parallel size
    frozen["run"].pop("checkpoint_every")
    frozen["run"].pop("output_dir")
    return hashlib.sha256(repr(sorted(frozen.items())).encode()).hexdigest()[:16]


def _truncate_metrics(run_dir: Path, step: int) -> None:
    """Drops records after ``step`` (logged after the checkpoint that a resume continues from)."""
    import json
    import os

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)
