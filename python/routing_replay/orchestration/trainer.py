"""One Megatron trainer rank: model, optimizer, routing collector and the step's phases.

A Ray actor body (``ray.remote(TrainerRank)``), usable in-process too. Every rank of the job runs
one; the driver gives each data-parallel rank its own samples (ranks are their own data-parallel
leaders: ``config.validate_job`` refuses tensor, pipeline and context parallelism). The
routing collector runs as a thread inside the rank, so SGLang sends each sample's routing
straight to the rank that trains on it.

Per step: ``old_logprobs`` (pi_old; R3 replays the rollout routing, R2 records the trainer's own;
routing recorded under another weight version than the step's is refused: ``StaleRoutingError``),
then ``update`` over N mini-batches of the seed's token-level objective, each in micro-batches with
the loss normalised by the mini-batch's token count over all data-parallel ranks. The optimisation
itself (megatron-core DDP, optimizer, schedule, checkpoints) is ``megatron.learner.Learner``; each
rank places its model on its own GPU where there is one (Ray gives the actor one).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from pydantic.dataclasses import dataclass as pydantic_dataclass

from routing_replay.megatron.paired import routing_flips, same_sets
from routing_replay.orchestration.trainer_settings import TrainerSettings
from routing_replay.rl.metrics import MiniBatchStats
from routing_replay.rl.minibatch import loss_and_metrics
from routing_replay.rl.rollout_batch import Sample, response_tensors, split
from routing_replay.rl.step_stats import StepStats
from routing_replay.settings import SETTINGS

if TYPE_CHECKING:
    from routing_replay.wire import RoutingSample


@pydantic_dataclass(frozen=True, config=SETTINGS, kw_only=True)
class TrainerSpec(TrainerSettings):
    """One rank's settings: the job's ``train`` section as it is (``TrainerSettings``: parallel sizes,
    optimizer, clipping, correction, replay, ...) and the values of other sections the rank needs."""

    rank: int
    world_size: int
    master_port: int
    model_path: str
    temperature: float
    """rollout.temperature: pi_old and pi_theta are scored at the rollout's temperature."""
    train_dtype: str
    """model.train_dtype (bfloat16 | float32)."""
    seed: int
    """run.seed."""
    routing_timeout: float = 120.0
    routing_bind: str = "tcp://127.0.0.1:*"
    """The collector's endpoint: loopback, or this node's address when engines run on other hosts."""


class TrainerRank:
    """Created bare (so the driver can learn rank 0's address first), then ``setup``."""

    def endpoint(self) -> tuple[str, int]:
        """This node's address and a free port: rank 0's is the job's rendezvous."""
        import ray

        from routing_replay.ports import free_port

        address = ray.util.get_node_ip_address()
        return address, free_port(address)

    def setup(self, spec: TrainerSpec, master_addr: str, resume_from: str | None = None) -> str:
        """Joins the process group, builds the model and optimizer, starts the routing collector;
        returns the collector's address."""
        import os
        import warnings

        from transformers import AutoConfig

        from routing_replay.megatron.hf_checkpoint import build_model
        from routing_replay.megatron.learner import Learner, recompute_overrides
        from routing_replay.megatron.parallel import initialize, on_local_device
        from routing_replay.megatron.replay import ModelReplay, RecordedRouting
        from routing_replay.wire import CollectorConfig, RoutingCollector

        self.spec = spec
        # megatron-core warns at import that it falls back to torch without TE/Apex: expected here.
        warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
        warnings.filterwarnings("ignore", message=r"full scope is deprecated")
        os.environ["MASTER_ADDR"] = master_addr
        initialize(spec.parallel, rank=spec.rank, world_size=spec.world_size, master_port=spec.master_port, seed=spec.seed)
        self.hf_config = AutoConfig.from_pretrained(spec.model_path)
        self.model = on_local_device(build_model(spec.model_path, spec.parallel, dtype=getattr(torch, spec.train_dtype),
                                                 **recompute_overrides(spec.recompute, spec.recompute_layers)))
        self.device = next(self.model.parameters()).device
        self.replay = ModelReplay(self.model)
        self.recorded = RecordedRouting(self.replay.num_experts)
        self.learner = Learner(self.model, spec.optimizer)
        self.collector = RoutingCollector(CollectorConfig(bind=spec.routing_bind))
        self._routing: dict[str, RoutingSample] = {}
        self._old: dict[str, torch.Tensor] = {}
        if resume_from is not None:
            self.load_checkpoint(resume_from)
        return self.collector.address

    # ---- placement ------------------------------------------------------------------------------

    def discard_routing(self, keys: list[str]) -> int:
        return self.collector.discard(keys)

    def health(self) -> None:
        """Raises BackgroundThreadDied if this rank's routing collector thread has died: without
        it the rank cannot receive the routing of the coming rollouts."""
        self.collector.check()

    # ---- supervised warm start --------------------------------------------------------------------

    def sft(self, batches: Sequence[Sequence[tuple[Sequence[int], Sequence[int]]]], learning_rate: float) -> list[float]:
        """Cross-entropy on the target tokens of (prompt ids, target ids) pairs, one optimizer step
        per batch at a constant ``learning_rate``; the RL optimizer and schedule start fresh after."""
        from dataclasses import replace

        from routing_replay.megatron.logprobs import Batch, score

        self.learner.reset(replace(self.spec.optimizer, learning_rate=learning_rate, min_learning_rate=0.0,
                                   warmup_steps=0, decay="constant"))
        losses = []
        for pairs in batches:
            sequences = [[*prompt, *target] for prompt, target in pairs]
            batch = Batch.from_sequences(sequences)
            mask = torch.zeros(len(pairs), batch.tokens.shape[1] - 1, dtype=torch.bool)
            for row, (prompt, target) in enumerate(pairs):
                mask[row, len(prompt) - 1 : len(prompt) - 1 + len(target)] = True
            logprobs = score(self.model, batch).logprobs
            loss = self._global_token_mean(-(logprobs * mask.to(self.device)).sum(), int(mask.sum()))
            self.learner.zero_grad()
            loss.backward()
            self.learner.step()
            losses.append(float(loss.detach()))
        self.learner.reset(self.spec.optimizer)
        return losses

    # ---- the RL step --------------------------------------------------------------------------------

    def old_logprobs(self, samples: Sequence[Sample], weight_version: str) -> StepStats:
        """pi_old over this rank's samples (kept for the update), in the update's micro-batches (so
        mini-batch 0 starts exactly on-policy); statistics of the mismatch and of the routing.
        ``weight_version`` is the version the engines sampled these samples with: routing recorded
        under any other is refused (``StaleRoutingError``).

        The objective's pi_old is scored under the rollout's routing (R3) or the trainer's own (R2
        records it for the update, ``none`` for the replay-agreement metric). With
        ``paired_diagnostics`` both are scored on the same tokens in every mode: ``paired/own/*``
        and ``paired/rollout/*``, split by whether a routing flip can reach the scored token."""
        started = time.perf_counter()
        stats = StepStats()
        routing_seconds = 0.0
        if self._wants_rollout_routing():
            self._routing = self.collector.take([s.key for s in samples], timeout=self.spec.routing_timeout,
                                                token_ids={s.key: s.token_ids for s in samples})
            _refuse_stale(self._routing, weight_version)
            routing_seconds = time.perf_counter() - started
        # (token, layer) positions the engines did not record, as their records say (0: none taken)
        stats.add_total("routing/missing", sum(sample.record.missing for sample in self._routing.values()))
        self._old.clear()
        self.recorded.clear()
        with torch.no_grad():
            for micro in self._update_micro_batches(samples):
                self._score_old(micro, stats)
        stats.maxima["time/routing_take"] = routing_seconds
        stats.maxima["time/old_logprob"] = time.perf_counter() - started - routing_seconds
        return stats

    def update(self, samples: Sequence[Sample]) -> StepStats:
        """N mini-batches of the token-level objective; statistics per mini-batch index, and how
        much of the routing held fixed the current model still chooses itself."""
        started = time.perf_counter()
        stats = StepStats()
        for index, mini in enumerate(self._mini_batches(samples)):
            tokens = self._global_count(sum(len(s.response_ids) for s in mini))
            self.learner.zero_grad()
            for micro in self._micro_batches(mini):
                batch, mask, mu = self._tensors(micro)
                old = torch.zeros(mu.shape)
                for row, sample in enumerate(micro):
                    old[row, : len(sample.token_ids) - 1] = self._old[sample.key]
                old = old.to(self.device)
                adv = torch.tensor([s.advantage for s in micro], dtype=torch.float32, device=self.device)
                mini_stats, agreeing, compared = self._update_forward(micro, batch, lambda scores: loss_and_metrics(
                    scores.logprobs, old, mu, adv, mask, self.spec.clip, self.spec.correction, tokens))
                stats.add_mini_batch(index, mini_stats)
                stats.add_share(f"replay/agreement/mb{index}", agreeing, compared)
            result = self.learner.step()
            stats.maxima[f"grad_norm/mb{index}"] = result.grad_norm  # global: equal on every rank
            stats.maxima[f"learning_rate/mb{index}"] = result.learning_rate
            stats.add_total("optimizer/skipped_steps", int(not result.updated))
        self._routing, self._old = {}, {}
        self.recorded.clear()
        stats.maxima["time/update"] = time.perf_counter() - started
        return stats

    def score(self, token_ids: list[int], temperature: float = 1.0) -> list[float]:
        """The trainer's log-prob of every token after the first (own routing: the weight-sync probe)."""
        from routing_replay.megatron.logprobs import Batch, score

        with torch.no_grad():
            return score(self.model, Batch.from_sequences([token_ids]), temperature).logprobs[0].tolist()

    # ---- weights and checkpoints --------------------------------------------------------------------

    def export_weights(self, out_dir: str) -> str | None:
        """Hugging Face safetensors, config and tokenizer for SGLang (collective; rank 0 writes)."""
        from transformers import AutoTokenizer

        from routing_replay.megatron.hf_checkpoint import save_hf

        out = save_hf(self.model, self.hf_config, out_dir, write=self.spec.rank == 0)
        if out is None:
            return None
        AutoTokenizer.from_pretrained(self.spec.model_path).save_pretrained(out)  # a restarted engine loads it
        return str(out)

    def weight_metadata(self):
        """Names, dtypes and shapes of the Hugging Face tensors a broadcast sends, in its order (from
        the parameters' global shapes: nothing is gathered)."""
        from routing_replay.orchestration.weight_sync import TensorMeta

        return TensorMeta.of_model(self.model, self.hf_config)

    def open_weight_group(self, group) -> None:
        """Rank 0 joins the engines' weight-broadcast group (blocks until they have too)."""
        from routing_replay.orchestration.weight_sync import open_group

        self.close_weight_group()
        if self.spec.rank == 0:
            self._weight_group = open_group(group)

    def broadcast_weights(self, meta) -> None:
        """Streams the weights to rank 0 bucket by bucket (collective), which broadcasts each
        bucket to the engines as it arrives."""
        from routing_replay.orchestration.weight_sync import broadcast_model

        broadcast_model(self.model, self.hf_config, meta, getattr(self, "_weight_group", None))

    def close_weight_group(self) -> None:
        group, self._weight_group = getattr(self, "_weight_group", None), None
        if group is not None:
            dist.destroy_process_group(group)

    def save_checkpoint(self, directory: str) -> None:
        """Model, optimizer, schedule and RNG (collective; megatron-core dist_checkpointing under
        ``directory/trainer``: each rank writes its shards, the driver commits the directory)."""
        self.learner.save(Path(directory) / "trainer")

    def load_checkpoint(self, directory: str) -> None:
        self.learner.load(Path(directory) / "trainer")

    def state_digest(self) -> dict[str, str]:
        """SHA-256 of this rank's weights, fp32 main params, Adam moments and the optimizer step:
        what a bit-exact resume must reproduce."""
        from routing_replay.megatron.learner import state_digest

        return state_digest(self.learner)

    def close(self) -> None:
        self.close_weight_group()
        self.collector.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- internals ----------------------------------------------------------------------------------

    def _micro_batches(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        size = self.spec.micro_batch_size
        return [list(samples[i : i + size]) for i in range(0, len(samples), size)]

    def _tensors(self, micro: Sequence[Sample], device: torch.device | str | None = None):
        """The micro-batch's tokens, response mask and rollout log-probs (mask and log-probs on
        ``device``, default the model's)."""
        from routing_replay.megatron.logprobs import Batch

        batch = Batch.from_sequences([s.token_ids for s in micro])
        mask, mu = response_tensors(micro, batch.tokens.shape[1] - 1)
        device = self.device if device is None else device
        return batch, mask.to(device), mu.to(device)

    def _wants_rollout_routing(self) -> bool:
        return self.spec.replay == "R3" or self.spec.paired_diagnostics

    def _mini_batches(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        return [[samples[i] for i in share] for share in split(len(samples), self.spec.mini_batches)]

    def _update_micro_batches(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        return [micro for mini in self._mini_batches(samples) for micro in self._micro_batches(mini)]

    def _score_old(self, micro: Sequence[Sample], stats: StepStats) -> None:
        """One micro-batch of pi_old: scored under the trainer's own routing (recorded) and/or the
        rollout's (replayed, coverage checked)."""
        from routing_replay.megatron.logprobs import score
        from routing_replay.megatron.replay import rollout_indices_from_wire
        from routing_replay.rl.metrics import RatioStats

        batch, mask, mu = self._tensors(micro, "cpu")  # pi_old and its statistics live on the CPU
        keys = [s.key for s in micro]
        own = rollout = None
        if self.spec.replay != "R3" or self.spec.paired_diagnostics:
            with self.replay.recording() as own_topk:  # int64 on the device, as the routers chose
                own = score(self.model, batch, self.spec.temperature).to("cpu")
            self.recorded.add(keys, own_topk, [len(s.token_ids) for s in micro])
        if self._wants_rollout_routing():
            routing = rollout_indices_from_wire([self._routing[k] for k in keys], batch.tokens.shape[1], self.device)
            self._count_coverage(micro, batch, routing.mask, stats)
            with self.replay.replaying(routing):
                rollout = score(self.model, batch, self.spec.temperature).to("cpu")
            _add_routing_report(self.replay.report(), stats)
        used = rollout if self.spec.replay == "R3" else own
        for row, sample in enumerate(micro):
            self._old[sample.key] = used.logprobs[row, : len(sample.token_ids) - 1]
        stats.add_ratio("mismatch", RatioStats.from_log_ratio(used.logprobs - mu, mask))
        stats.add_share("entropy", float(used.entropy[mask].sum()), int(mask.sum()))
        if own is not None and rollout is not None:
            _add_paired(stats, own.logprobs - mu, rollout.logprobs - mu, mask,
                        routing_flips(own_topk, routing.indices, routing.masks, len(micro)))

    def _count_coverage(self, micro: Sequence[Sample], batch, replay_mask: torch.Tensor, stats: StepStats) -> None:
        """Counts the rollout routing's coverage (``replay_mask`` ``[S * B, layers]``, sequence-major,
        as ``RouterIndices.mask``) of the positions that reach the loss; R3 refuses a micro-batch
        below ``min_replay_coverage`` rather than fall back to the trainer's routing."""
        replayed, needed = _replay_coverage(replay_mask, batch)
        stats.add_share("routing/coverage", int((replayed & needed).sum()), int(needed.sum()))
        covered = float((replayed & needed).sum()) / max(int(needed.sum()), 1)
        if self.spec.replay == "R3" and covered < self.spec.min_replay_coverage:
            gaps = [(s.key, (needed[row] & ~replayed[row]).nonzero().flatten().tolist())
                    for row, s in enumerate(micro)]
            named = "; ".join(f"{key}: positions {positions[:8]}{' ...' if len(positions) > 8 else ''}"
                              for key, positions in gaps if positions)
            raise ReplayCoverageError(f"R3 would replay {covered:.4f} of this micro-batch's loss positions "
                                      f"(train.min_replay_coverage={self.spec.min_replay_coverage}); the rollout "
                                      f"recorded no routing for {named}")

    def _update_forward(self, micro: Sequence[Sample], batch, loss_fn) -> tuple[MiniBatchStats, int, int]:
        """Forward and backward of one update micro-batch with the routing held fixed (R3: the
        rollout's, R2: the old policy's) or the model's own (``none``), inside the replay scope so
        recomputed router forwards replay the same routing. Also counts the (token, layer) pairs
        where the current model's own top-k equals the fixed routing (``none``: the old policy's)."""
        from routing_replay.megatron.logprobs import score
        from routing_replay.megatron.replay import rollout_indices_from_wire

        keys, seq_len = [s.key for s in micro], batch.tokens.shape[1]
        if self.spec.replay == "R3":
            held = rollout_indices_from_wire([self._routing[k] for k in keys], seq_len, self.device)
        else:
            held = self.recorded.indices_for(keys, seq_len, self.device)
        replaying = self.spec.replay != "none"
        with self.replay.replaying(held) if replaying else self.replay.recording() as own:
            scores = score(self.model, batch, self.spec.temperature)
            loss, mini_stats = loss_fn(scores)
            loss.backward()
        if replaying:
            report = self.replay.report()
            return mini_stats, sum(report.agreeing), sum(report.replayed)
        same = [same_sets(o, h)[m] for o, h, m in zip(own, held.indices, held.masks, strict=True)]
        return mini_stats, sum(int(x.sum()) for x in same), sum(x.numel() for x in same)

    def _global_count(self, count: int) -> int:
        if self.spec.parallel.data == 1:
            return count
        from routing_replay.megatron.parallel import data_parallel_group

        total = torch.tensor([count], dtype=torch.int64, device=self.device)  # NCCL reduces device tensors
        dist.all_reduce(total, group=data_parallel_group())
        return int(total)

    def _global_token_mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        return total / max(self._global_count(count), 1)


class ReplayCoverageError(RuntimeError):
    """R3 would replay less of a batch's loss positions than ``train.min_replay_coverage``: the
    trainer would silently fall back to its own routing there."""


class StaleRoutingError(RuntimeError):
    """Routing recorded under other weights than the rollout was sampled with (a sample left over
    from an earlier step, or an engine that missed a weight update): replaying it would hold the
    update to another policy's routing."""


def _refuse_stale(routing: Mapping[str, RoutingSample], weight_version: str) -> None:
    """Raises ``StaleRoutingError`` naming the samples whose record's weight version is not
    ``weight_version``."""
    stale: dict[str, list[str]] = {}
    for key, sample in routing.items():
        if sample.record.weight_version != weight_version:
            stale.setdefault(sample.record.weight_version, []).append(key)
    if stale:
        named = "; ".join(f"{len(keys)} recorded under {version!r} ({', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''})"
                          for version, keys in sorted(stale.items()))
        raise StaleRoutingError(f"the rollout sampled with weight version {weight_version!r}, but routing of "
                                f"{sum(map(len, stale.values()))} sample(s) is stale: {named}")


def _replay_coverage(replay_mask: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """``(replayed, needed)``, both ``[B, S - 1]`` on the CPU: positions with a rollout row in every
    layer, and the positions that can reach the loss (real tokens followed by a token of the same
    sequence: each sequence's last token and padding cannot)."""
    seq_len, rows = batch.tokens.shape[1], batch.tokens.shape[0]
    replayed = replay_mask.all(1).cpu().view(seq_len, rows).T[:, :-1]  # one bool per token crosses
    needed = batch.valid[:, 1:] & (batch.segments[:, 1:] == batch.segments[:, :-1])
    return replayed, needed


def _add_routing_report(report, stats: StepStats) -> None:
    """The replayed forward's per-layer agreement of the model's own top-k with the replayed one."""
    for layer, (agreeing, replayed) in enumerate(zip(report.agreeing, report.replayed, strict=True)):
        stats.add_share(f"routing/agreement/layer{layer}", agreeing, replayed)
    stats.add_total("routing/tokens_differing", report.tokens_differing)


def _add_paired(stats: StepStats, own: torch.Tensor, rollout: torch.Tensor, mask: torch.Tensor, flips) -> None:
    """The mismatch (log pi_old - log mu_old) under both routings on the same tokens, overall and
    split by whether a flip reaches the token, and the flips' shares."""
    from routing_replay.rl.metrics import RatioStats

    for layer, (flipped, compared) in enumerate(zip(flips.flipped, flips.compared, strict=True)):
        stats.add_share(f"paired/flip_share/layer{layer}", flipped, compared)
    stats.add_share("paired/flip_share", sum(flips.flipped), sum(flips.compared))
    affected = flips.affected & mask
    stats.add_share("paired/tokens_flipped_share", int(affected.sum()), int(mask.sum()))
    for name, log_ratio in (("own", own), ("rollout", rollout)):
        stats.add_ratio(f"paired/{name}", RatioStats.from_log_ratio(log_ratio, mask))
        stats.add_ratio(f"paired/{name}/flipped", RatioStats.from_log_ratio(log_ratio, affected))
        stats.add_ratio(f"paired/{name}/unflipped", RatioStats.from_log_ratio(log_ratio, mask & ~affected))
