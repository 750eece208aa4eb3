"""Routing replay through megatron-core's own RouterReplay, scoped to one model and verified.

megatron-core (0.16+) gives every TopKRouter a ``RouterReplay`` instance whose ``get_replay_topk``
wraps the router's top-k; its class-level registry and global actions would let a second model in
the process (reference, critic) collide with the trained one. ``ModelReplay`` instead walks *this*
model's routers and wraps *their* instances' ``get_replay_topk``:

- every forward computes the router's own top-k (kept for metrics, and used where no replay row
  exists: the mask);
- while ``replaying(...)`` is active, each router uses the given indices where its mask is True;
  probabilities are the router's scores gathered at those experts, so the router still gets
  gradients (as in megatron-core's REPLAY_FORWARD);
- ``recording()`` captures each router's own indices (R2 records the old policy this way);
- verification is always on: after each replayed forward the router's actual routing map is
  compared with the intended indices, and any difference (a fused router path that ignores
  replay, token dropping) raises ``ReplayVerificationError`` naming the layer and token count.

Refused at construction: ``moe_router_fusion=True`` (silently bypasses replay) and
``moe_expert_capacity_factor`` (token dropping changes routing after replay). Token order is
Megatron's: sequence-major, row ``s * B + b`` (``rollout_to_router_indices`` builds it).

Activation recompute re-runs router forwards during backward; run ``backward()`` inside the
``replaying()`` block and the recomputed forwards replay the same routing (tested: gradients equal
those without recompute). A recomputed forward of a replayed step outside the block raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from routing_replay.megatron.paired import same_sets


class ReplayVerificationError(RuntimeError):
    """The routing the model actually used differs from the routing it was told to replay."""


@dataclass(frozen=True)
class ReplayReport:
    """What one replayed forward did, per router (layer) of the model."""

    agreement: list[float]
    """Per layer: fraction of replayed tokens whose own top-k set equals the replayed set."""
    coverage: float
    """Fraction of routed tokens that were replayed (the rest used the model's own routing)."""
    tokens_differing: int
    """Tokens whose own top-k set differs from the replayed one in at least one layer."""
    agreeing: list[int]
    """Per layer: replayed tokens whose own top-k set equals the replayed set."""
    replayed: list[int]
    """Per layer: replayed tokens (the denominator of ``agreement``)."""


@dataclass
class _LayerForward:
    own: torch.Tensor
    chosen: torch.Tensor
    mask: torch.Tensor


class ModelReplay:
    def __init__(self, model) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        config = model.config
        if not config.moe_enable_routing_replay:
            raise ValueError("routing replay needs TransformerConfig(moe_enable_routing_replay=True)")
        if config.moe_router_fusion:
            raise ValueError("moe_router_fusion=True bypasses routing replay silently; refusing to replay")
        if config.moe_expert_capacity_factor is not None:
            raise ValueError("moe_expert_capacity_factor drops tokens after replay, changing the routing; refusing")
        self.routers = [m for _, m in model.named_modules() if isinstance(m, TopKRouter)]
        self.top_k, self.num_experts = config.moe_router_topk, config.num_moe_experts
        self._plan: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._record: list[torch.Tensor | None] | None = None
        self._last: list[_LayerForward | None] = [None] * len(self.routers)
        self._last_forward_replayed = False
        for layer, router in enumerate(self.routers):
            router.router_replay.get_replay_topk = self._topk_for(layer)
            router.register_forward_hook(self._verifier_for(layer))

    @property
    def num_layers(self) -> int:
        return len(self.routers)

    # ---- public --------------------------------------------------------------------------------

    @contextmanager
    def replaying(self, indices: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None) -> Iterator[None]:
        """Forwards inside use ``indices[l]`` ``[tokens, top_k]`` at router ``l`` where ``masks[l]``
        ``[tokens]`` is True (all tokens when masks is None)."""
        self._plan = self._validated_plan(indices, masks)
        self._last = [None] * self.num_layers
        try:
            yield
        finally:
            self._plan = None
        unused = [layer for layer, seen in enumerate(self._last) if seen is None]
        if unused:
            raise ReplayVerificationError(f"replay data was never consumed by layer(s) {unused}: did the forward run?")

    @contextmanager
    def recording(self) -> Iterator[list[torch.Tensor]]:
        """Yields a list that holds each router's own ``[tokens, top_k]`` indices after the forward."""
        recorded: list[torch.Tensor] = []
        self._record = [None] * self.num_layers
        try:
            yield recorded
        finally:
            captured, self._record = self._record, None
        missing = [layer for layer, t in enumerate(captured) if t is None]
        if missing:
            raise ReplayVerificationError(f"no routing recorded at layer(s) {missing}")
        recorded.extend(captured)

    def report(self) -> ReplayReport:
        """Metrics of the last replayed forward."""
        if any(f is None for f in self._last):
            raise RuntimeError("no replayed forward to report on")
        agreement, agreeing, counts, differing, replayed, total = [], [], [], None, 0, 0
        for forward in self._last:
            same = same_sets(forward.own, forward.chosen) | ~forward.mask
            replayed, total = int(forward.mask.sum()), forward.mask.numel()
            agreeing.append(int(same[forward.mask].sum()))
            counts.append(replayed)
            agreement.append(agreeing[-1] / replayed if replayed else 1.0)
            differing = ~same if differing is None else differing | ~same
        return ReplayReport(agreement, replayed / max(total, 1), int(differing.sum()), agreeing, counts)

    # ---- inside the router -----------------------------------------------------------------------

    def _validated_plan(self, indices, masks) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if len(indices) != self.num_layers:
            raise ValueError(f"replay needs {self.num_layers} tensors (one per router), got {len(indices)}")
        plan = []
        for layer, ids in enumerate(indices):
            if ids.dim() != 2 or ids.shape[1] != self.top_k:
                raise ValueError(f"layer {layer}: replay indices must be [tokens, {self.top_k}], got {tuple(ids.shape)}")
            mask = torch.ones(ids.shape[0], dtype=torch.bool) if masks is None else masks[layer].bool()
            if mask.shape != (ids.shape[0],):
                raise ValueError(f"layer {layer}: mask must be [{ids.shape[0]}], got {tuple(mask.shape)}")
            used = ids[mask]
            if used.numel() and (int(used.min()) < 0 or int(used.max()) >= self.num_experts):
                raise ValueError(f"layer {layer}: replayed expert ids must lie in 0..{self.num_experts - 1}, "
                                 f"got {int(used.min())}..{int(used.max())}")
            plan.append((ids.long(), mask))
        return plan

    def _topk_for(self, layer: int):
        def get_replay_topk(scores, topk, num_groups=None, group_topk=None, default_compute_topk=None):
            values, own = default_compute_topk(scores, topk, num_groups=num_groups, group_topk=group_topk)
            if self._record is not None:
                self._record[layer] = own.detach().clone()
            in_backward = torch._C._current_graph_task_id() != -1  # activation recompute
            if self._plan is None:
                if in_backward and self._last_forward_replayed:
                    raise ReplayVerificationError(
                        f"layer {layer}: activation recompute re-ran a replayed forward outside replaying(); "
                        "call backward() inside the replaying() block")
                if not in_backward:
                    self._last_forward_replayed = False
                return values, own
            self._last_forward_replayed = True
            target, mask = self._plan[layer]
            if target.shape[0] != scores.shape[0]:
                raise ValueError(f"layer {layer}: {target.shape[0]} replay rows for {scores.shape[0]} routed tokens")
            mask = mask.to(scores.device)
            chosen = torch.where(mask[:, None], target.to(scores.device), own)
            self._last[layer] = _LayerForward(own.detach(), chosen, mask)
            return scores.gather(1, chosen), chosen

        return get_replay_topk

    def _verifier_for(self, layer: int):
        def verify(module, inputs, outputs) -> None:
            if self._plan is None:
                return
            forward = self._last[layer]
            if forward is None:
                raise ReplayVerificationError(f"layer {layer}: the router ran without consulting replay "
                                              "(fused or custom top-k path?)")
            routing_map = outputs[1]
            intended = torch.zeros_like(routing_map).scatter(1, forward.chosen, True)
            wrong = (routing_map != intended).any(1) & forward.mask
            if wrong.any():
                raise ReplayVerificationError(f"layer {layer}: {int(wrong.sum())} of {int(forward.mask.sum())} "
                                              "replayed tokens were routed differently than replayed")

        return verify


def rollout_to_router_indices(rows: Sequence[torch.Tensor], starts: Sequence[int], seq_len: int,
                              valid: Sequence[torch.Tensor | None] | None = None,
                              placements: Sequence[tuple[int, int]] | None = None,
                              ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Rollout routing per sample (``rows[i]`` ``[r_i, L, K]`` covering sequence positions
    ``starts[i] ..``) -> per router ``[seq_len * B, K]`` indices in Megatron's sequence-major token
    order (row ``s * B + b``) and ``[seq_len * B]`` masks, False where no row exists (the last token,
    padding, positions before ``start``, or rows the rollout did not record). Sample ``i`` sits in
    batch row ``i`` at offset 0, or where ``placements[i] = (row, offset)`` says (packed batches)."""
    placements = list(placements) if placements is not None else [(i, 0) for i in range(len(rows))]
    batch = 1 + max(row for row, _ in placements)
    layers, top_k = rows[0].shape[1], rows[0].shape[2]
    indices = torch.zeros(seq_len, batch, layers, top_k, dtype=torch.int64)
    mask = torch.zeros(seq_len, batch, layers, dtype=torch.bool)
    for i, (sample, start, (b, offset)) in enumerate(zip(rows, starts, placements)):
        if sample.shape[1:] != (layers, top_k):
            raise ValueError(f"sample {i}: rows of shape {tuple(sample.shape[1:])}, expected {(layers, top_k)}")
        begin, end = offset + start, offset + start + sample.shape[0]
        if end > seq_len:
            raise ValueError(f"sample {i}: rows reach position {end} beyond the batch's {seq_len} positions")
        indices[begin:end, b] = sample.long()
        present = torch.ones(sample.shape[:2], dtype=torch.bool)
        if valid is not None and valid[i] is not None:
            present = valid[i].bool()
        mask[begin:end, b] = present
    flat_ids, flat_mask = indices.reshape(seq_len * batch, layers, top_k), mask.reshape(seq_len * batch, layers)
    return [flat_ids[:, l].contiguous() for l in range(layers)], [flat_mask[:, l].contiguous() for l in range(layers)]


def sequence_parallel_shard(rows: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """The rows a tensor-parallel rank's routers see under sequence parallelism: Megatron splits
    the sequence dimension, and rows are sequence-major, so rank r takes the r-th contiguous chunk."""
    if rows.shape[0] % size:
        raise ValueError(f"{rows.shape[0]} rows do not split evenly over {size} sequence-parallel ranks")
    chunk = rows.shape[0] // size
    return rows[rank * chunk : (rank + 1) * chunk]


def rollout_indices_from_wire(samples: Sequence, seq_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """``rollout_to_router_indices`` for routing received over the wire (``RoutingSample``s in the
    batch's sample order): rows start at each header's ``start``; unrecorded rows stay masked."""
    for sample in samples:
        if sample.header.layer_start != 0 or sample.header.layer_stop != sample.header.num_layers:
            raise ValueError(f"{sample.header.key!r} carries layers [{sample.header.layer_start}, "
                             f"{sample.header.layer_stop}) only; a full model needs all {sample.header.num_layers}")
    return rollout_to_router_indices([s.routing for s in samples], [s.header.start for s in samples], seq_len,
                                     [s.valid for s in samples])


class RecordedRouting:
    """R2's store: routing recorded in the old-policy forward, kept per sample key, and
    re-assembled for whatever micro-batches the update uses (other sizes, order, padding)."""

    def __init__(self) -> None:
        self._rows: dict[str, torch.Tensor] = {}

    def add(self, keys: Sequence[str], recorded: Sequence[torch.Tensor], lengths: Sequence[int]) -> None:
        """``recorded[l]`` ``[S * B, K]`` from ``ModelReplay.recording()`` over a batch whose sample
        ``b`` has key ``keys[b]`` and ``lengths[b]`` real tokens."""
        batch = len(keys)
        per_layer = [r.view(-1, batch, r.shape[-1]) for r in recorded]  # [S, B, K], sequence-major
        for b, (key, length) in enumerate(zip(keys, lengths)):
            self._rows[key] = torch.stack([layer[:length, b] for layer in per_layer], dim=1).clone()

    def indices_for(self, keys: Sequence[str], seq_len: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        missing = [k for k in keys if k not in self._rows]
        if missing:
            raise KeyError(f"no recorded routing for {missing[:5]} ({len(missing)} sample(s))")
        return rollout_to_router_indices([self._rows[k] for k in keys], [0] * len(keys), seq_len)

    def clear(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)


def context_parallel_positions(seq_len: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """Sequence positions a context-parallel rank holds: Megatron splits the sequence into
    ``2 * cp_size`` chunks and gives rank r chunks r and ``2 * cp_size - 1 - r`` (causal load balance)."""
    if seq_len % (2 * cp_size):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x context-parallel size {cp_size}")
    chunk = seq_len // (2 * cp_size)
    first, second = cp_rank * chunk, (2 * cp_size - 1 - cp_rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def context_parallel_rows(rows: torch.Tensor, batch: int, cp_size: int, cp_rank: int) -> torch.Tensor:
    """The sequence-major rows (``[S * B, ...]``) a context-parallel rank's routers see, in its order."""
    seq_len = rows.shape[0] // batch
    local = rows.view(seq_len, batch, *rows.shape[1:])[context_parallel_positions(seq_len, cp_size, cp_rank)]
    return local.reshape(-1, *rows.shape[1:])
