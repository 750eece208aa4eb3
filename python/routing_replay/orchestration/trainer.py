"""One Megatron trainer rank: model, optimizer, routing collector and the step's phases.

A Ray actor body (``ray.remote(TrainerRank)``), usable in-process too. Every rank of the job runs
one; the driver gives each data-parallel rank its own samples (ranks are their own data-parallel
leaders: ``config.validate_job`` refuses tensor, pipeline and context parallelism). The
routing collector runs as a thread inside the rank, so SGLang sends each sample's routing
straight to the rank that trains on it.

Per step: ``old_logprobs`` (pi_old; R3 replays the rollout routing, R2 records the trainer's own),
then ``update`` over N mini-batches of the seed's token-level objective, each in micro-batches with
the loss normalised by the mini-batch's token count over all data-parallel ranks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from routing_replay.rl.corrections import Correction
from routing_replay.rl.minibatch import loss_and_metrics
from routing_replay.rl.objective import Clip
from routing_replay.rl.rollout_batch import Sample, response_tensors, split


@dataclass(frozen=True)
class TrainerSpec:
    rank: int
    world_size: int
    master_port: int
    model_path: str
    data_parallel: int = 1
    expert_parallel: int = 1
    replay: str = "R3"
    """none | R2 | R3"""
    learning_rate: float = 1e-5
    mini_batches: int = 1
    micro_batch_size: int = 4
    clip: Clip = Clip()
    correction: Correction = Correction()
    grad_clip: float = 1.0
    temperature: float = 1.0
    train_dtype: str = "float32"
    seed: int = 0
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
        from routing_replay.megatron.parallel import ParallelConfig, initialize
        from routing_replay.megatron.replay import ModelReplay, RecordedRouting
        from routing_replay.wire import CollectorConfig, RoutingCollector

        self.spec = spec
        # megatron-core warns at import that it falls back to torch without TE/Apex: expected here.
        warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).*not installed")
        warnings.filterwarnings("ignore", message=r"full scope is deprecated")
        os.environ["MASTER_ADDR"] = master_addr
        parallel = ParallelConfig(expert=spec.expert_parallel)
        initialize(parallel, rank=spec.rank, world_size=spec.world_size, master_port=spec.master_port, seed=spec.seed)
        self.hf_config = AutoConfig.from_pretrained(spec.model_path)
        self.model = build_model(spec.model_path, parallel, dtype=getattr(torch, spec.train_dtype))
        self.replay = ModelReplay(self.model)
        self.recorded = RecordedRouting()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=spec.learning_rate, weight_decay=0.0)
        self.collector = RoutingCollector(CollectorConfig(bind=spec.routing_bind))
        self._routing: dict[str, object] = {}
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
        per batch, with a separate optimizer (the RL optimizer's state starts fresh after)."""
        from routing_replay.megatron.logprobs import Batch, score

        optimizer = torch.optim.AdamW(self.model.parameters(), lr=learning_rate, weight_decay=0.0)
        losses = []
        for pairs in batches:
            sequences = [[*prompt, *target] for prompt, target in pairs]
            batch = Batch.from_sequences(sequences)
            mask = torch.zeros(len(pairs), batch.tokens.shape[1] - 1, dtype=torch.bool)
            for row, (prompt, target) in enumerate(pairs):
                mask[row, len(prompt) - 1 : len(prompt) - 1 + len(target)] = True
            logprobs = score(self.model, batch).logprobs
            loss = self._global_token_mean(-(logprobs * mask).sum(), int(mask.sum()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self._reduce_gradients()
            optimizer.step()
            losses.append(float(loss.detach()))
        return losses

    # ---- the RL step --------------------------------------------------------------------------------

    def old_logprobs(self, samples: Sequence[Sample]) -> dict[str, float]:
        """pi_old over this rank's samples (kept for the update); metrics of the mismatch and the routing."""
        started = time.perf_counter()
        routing_seconds = 0.0
        if self.spec.replay == "R3":
            keys = [s.key for s in samples]
            self._routing = self.collector.take(keys, timeout=self.spec.routing_timeout,
                                                token_ids={s.key: s.token_ids for s in samples})
            routing_seconds = time.perf_counter() - started
        self._old.clear()
        self.recorded.clear()
        reports, entropy, mismatch = [], [], []
        with torch.no_grad():
            for micro in self._micro_batches(samples):
                batch, mask, mu = self._tensors(micro)
                scores, report = self._forward(micro, batch, record=self.spec.replay == "R2")
                for row, sample in enumerate(micro):  # trimmed: the update batches samples differently
                    self._old[sample.key] = scores.logprobs[row, : len(sample.token_ids) - 1]
                entropy.append(scores.entropy[mask])
                mismatch.append((scores.logprobs - mu)[mask])
                if report is not None:
                    reports.append(report)
        from routing_replay.rl.metrics import ratio_stats

        log_rho = torch.cat(mismatch)
        out = {f"mismatch/{k}": v for k, v in ratio_stats(log_rho, torch.ones_like(log_rho, dtype=torch.bool)).items()}
        out["entropy"] = float(torch.cat(entropy).mean())
        out.update(_routing_metrics(reports))
        out["time/routing_take"] = routing_seconds
        out["time/old_logprob"] = time.perf_counter() - started - routing_seconds
        return out

    def update(self, samples: Sequence[Sample]) -> dict[str, float]:
        """N mini-batches of the token-level objective; metrics per mini-batch index ``mb{i}``."""
        started = time.perf_counter()
        out: dict[str, float] = {}
        for index, share in enumerate(split(len(samples), self.spec.mini_batches)):
            mini = [samples[i] for i in share]
            tokens = self._global_count(sum(len(s.response_ids) for s in mini))
            sums: dict[str, list[float]] = defaultdict(list)
            self.optimizer.zero_grad(set_to_none=True)
            for micro in self._micro_batches(mini):
                batch, mask, mu = self._tensors(micro)
                old = torch.zeros_like(mu)
                for row, sample in enumerate(micro):
                    old[row, : len(sample.token_ids) - 1] = self._old[sample.key]
                adv = torch.tensor([s.advantage for s in micro], dtype=torch.float32)
                scores, _ = self._forward(micro, batch, backward=lambda s: loss_and_metrics(
                    s.logprobs, old, mu, adv, mask, self.spec.clip, self.spec.correction, tokens))
                for name, value in scores.items():
                    sums[name].append(value)
            self._reduce_gradients()
            grad_norm = self._clip_gradients()
            self.optimizer.step()
            out.update({_per_mini_batch(name, index): sum(values) / len(values) for name, values in sums.items()})
            out[f"grad_norm/mb{index}"] = grad_norm
        self._routing, self._old = {}, {}
        self.recorded.clear()
        out["time/update"] = time.perf_counter() - started
        return out

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
        """Names, dtypes and shapes of the Hugging Face tensors a broadcast sends (collective)."""
        from routing_replay.megatron.hf_checkpoint import export_hf
        from routing_replay.orchestration.weight_sync import TensorMeta

        return TensorMeta.of(export_hf(self.model, self.hf_config))

    def open_weight_group(self, group) -> None:
        """Rank 0 joins the engines' weight-broadcast group (blocks until they have too)."""
        from routing_replay.orchestration.weight_sync import open_group

        self.close_weight_group()
        if self.spec.rank == 0:
            self._weight_group = open_group(group)

    def broadcast_weights(self, meta) -> None:
        """Exports the weights (collective) and rank 0 broadcasts them to the engines."""
        from routing_replay.megatron.hf_checkpoint import export_hf
        from routing_replay.orchestration.weight_sync import broadcast

        named = export_hf(self.model, self.hf_config)
        if self.spec.rank == 0:
            broadcast(named, meta, self._weight_group)

    def close_weight_group(self) -> None:
        group, self._weight_group = getattr(self, "_weight_group", None), None
        if group is not None:
            dist.destroy_process_group(group)

    def save_checkpoint(self, directory: str) -> None:
        path = Path(directory) / f"trainer-rank{self.spec.rank}.pt"
        tmp = path.with_suffix(".tmp")
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}, tmp)
        tmp.replace(path)

    def load_checkpoint(self, directory: str) -> None:
        state = torch.load(Path(directory) / f"trainer-rank{self.spec.rank}.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])

    def close(self) -> None:
        self.close_weight_group()
        self.collector.close()
        if dist.is_initialized():
            dist.destroy_process_group()

    # ---- internals ----------------------------------------------------------------------------------

    def _micro_batches(self, samples: Sequence[Sample]) -> list[list[Sample]]:
        size = self.spec.micro_batch_size
        return [list(samples[i : i + size]) for i in range(0, len(samples), size)]

    def _tensors(self, micro: Sequence[Sample]):
        from routing_replay.megatron.logprobs import Batch

        batch = Batch.from_sequences([s.token_ids for s in micro])
        mask, mu = response_tensors(micro, batch.tokens.shape[1] - 1)
        return batch, mask, mu

    def _forward(self, micro: Sequence[Sample], batch, *, record: bool = False, backward=None):
        """One forward under this step's routing (replayed, recorded or the model's own); with
        ``backward`` (scores -> (loss, metrics)) also the backward, inside the replay scope so
        recomputed router forwards replay the same routing."""
        from routing_replay.megatron.logprobs import score
        from routing_replay.megatron.replay import rollout_indices_from_wire

        seq_len = batch.tokens.shape[1]
        keys = [s.key for s in micro]
        coverage = None
        if self.spec.replay == "R3":
            indices, masks = rollout_indices_from_wire([self._routing[k] for k in keys], seq_len)
            coverage = _coverage(masks, batch)
            scope = self.replay.replaying(indices, masks)
        elif self.spec.replay == "R2" and not record:
            scope = self.replay.replaying(*self.recorded.indices_for(keys, seq_len))
        elif record:
            scope = self.replay.recording()
        else:
            scope = nullcontext()
        with scope as recorded:
            scores = score(self.model, batch, self.spec.temperature)
            result = scores
            if backward is not None:
                loss, metrics = backward(scores)
                loss.backward()
                result = {"loss": float(loss.detach()), **metrics}
        if record:
            self.recorded.add(keys, recorded, [len(s.token_ids) for s in micro])
        replayed = self.spec.replay == "R3" or (self.spec.replay == "R2" and not record)
        return result, (_Routing(self.replay.report(), coverage) if replayed else None)

    def _global_count(self, count: int) -> int:
        if self.spec.data_parallel == 1:
            return count
        total = torch.tensor([count], dtype=torch.int64)
        dist.all_reduce(total, group=self._dp_group())
        return int(total)

    def _global_token_mean(self, total: torch.Tensor, count: int) -> torch.Tensor:
        return total / max(self._global_count(count), 1)

    def _reduce_gradients(self) -> None:
        """Sum gradients over data-parallel ranks (the loss is already a global token mean): dense
        parameters over the data-parallel group, experts over the expert-data-parallel group."""
        if self.spec.world_size == 1:
            return
        from megatron.core import parallel_state as ps

        for param in self.model.parameters():
            if param.grad is None:
                continue
            expert = not getattr(param, "allreduce", True)
            group = ps.get_expert_data_parallel_group() if expert else self._dp_group()
            if dist.get_world_size(group) > 1:
                dist.all_reduce(param.grad, group=group)

    def _clip_gradients(self) -> float:
        """Clips to ``grad_clip`` by the global norm: dense gradients are equal on every rank after
        the reduction, expert gradients differ per expert-parallel rank and are summed over them."""
        dense, expert = torch.zeros(()), torch.zeros(())
        for param in self.model.parameters():
            if param.grad is not None:
                squared = param.grad.detach().float().pow(2).sum()
                if getattr(param, "allreduce", True):
                    dense += squared
                else:
                    expert += squared
        if self.spec.expert_parallel > 1:
            from megatron.core import parallel_state as ps

            dist.all_reduce(expert, group=ps.get_expert_model_parallel_group())
        norm = float((dense + expert).sqrt())
        scale = self.spec.grad_clip / (norm + 1e-6)
        if scale < 1:
            for param in self.model.parameters():
                if param.grad is not None:
                    param.grad.mul_(scale)
        return norm

    @staticmethod
    def _dp_group():
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()


@dataclass(frozen=True)
class _Routing:
    report: object
    """The replay's ``ReplayReport``."""
    coverage: float | None
    """Fraction of loss-relevant positions replayed in every layer (R3); None: all are (R2)."""


def _per_mini_batch(name: str, index: int) -> str:
    """``mismatch/k3`` -> ``mismatch/mb0/k3``; ``loss`` -> ``loss/mb0``."""
    group, _, rest = name.partition("/")
    return f"{group}/mb{index}/{rest}" if rest else f"{group}/mb{index}"


def _coverage(masks: Sequence[torch.Tensor], batch) -> float:
    """Replayed share of the positions that can affect the loss: real tokens followed by a token
    of the same sequence (each sequence's last token and padding cannot)."""
    seq_len, rows = batch.tokens.shape[1], batch.tokens.shape[0]
    replayed = torch.stack([m.view(seq_len, rows) for m in masks]).all(0).T[:, :-1]  # [B, S - 1]
    needed = batch.valid[:, 1:] & (batch.segments[:, 1:] == batch.segments[:, :-1])
    return float(replayed[needed].float().mean())


def _routing_metrics(forwards: Sequence[_Routing]) -> dict[str, float]:
    if not forwards:
        return {}
    layers = len(forwards[0].report.agreement)
    out = {f"routing/agreement/layer{l}": sum(f.report.agreement[l] for f in forwards) / len(forwards)
           for l in range(layers)}
    coverages = [f.coverage for f in forwards if f.coverage is not None]
    out["routing/coverage"] = min(coverages) if coverages else 1.0
    out["routing/tokens_differing"] = float(sum(f.report.tokens_differing for f in forwards))
    return out
