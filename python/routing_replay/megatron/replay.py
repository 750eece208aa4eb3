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
Megatron's: sequence-major, row ``s * B + b``. ``rollout_to_router_indices`` builds it as
``RouterIndices`` on the model's device from the compact (uint8 / int16) rows as received: no int64
copy of the routing is ever built on the host; each router widens its own layer on the device.

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


_ID_DTYPES = frozenset({torch.uint8, torch.int16, torch.int32, torch.int64})


@dataclass(frozen=True)
class RouterIndices:
    """What each router replays, in Megatron's token order (row ``s * B + b``), kept compact:
    ``ids`` ``[tokens, layers, top_k]`` in the dtype they arrived in (uint8 / int16 from the wire
    or R2's store) and ``mask`` ``[tokens, layers]``, True where a row is to be replayed. The
    router widens its own layer to int64 (what top-k gathers need) on the device, per forward."""

    ids: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.ids.dim() != 3:
            raise ValueError(f"router indices must be [tokens, layers, top_k], got {tuple(self.ids.shape)}")
        if self.ids.dtype not in _ID_DTYPES:
            raise ValueError(f"expert ids must be an integer dtype, got {self.ids.dtype}")
        if self.mask.dtype != torch.bool or self.mask.shape != self.ids.shape[:2]:
            raise ValueError(f"the mask must be bool {tuple(self.ids.shape[:2])}, got {self.mask.dtype} "
                             f"{tuple(self.mask.shape)}")
        if self.mask.device != self.ids.device:
            raise ValueError(f"ids on {self.ids.device} but mask on {self.mask.device}")

    @classmethod
    def from_layers(cls, indices: Sequence[torch.Tensor], masks: Sequence[torch.Tensor] | None = None) -> RouterIndices:
        """From per-router ``[tokens, top_k]`` tensors (what ``ModelReplay.recording()`` yields) and
        optional ``[tokens]`` masks (all tokens when None)."""
        if not indices:
            raise ValueError("no layers given")
        for layer, ids in enumerate(indices):
            if ids.dim() != 2 or ids.shape != indices[0].shape:
                raise ValueError(f"layer {layer}: indices of shape {tuple(ids.shape)}, expected "
                                 f"[tokens, top_k] like layer 0's {tuple(indices[0].shape)}")
        ids = torch.stack(list(indices), dim=1)
        if masks is None:
            return cls(ids, torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device))
        if len(masks) != len(indices):
            raise ValueError(f"{len(masks)} masks for {len(indices)} layers")
        for layer, mask in enumerate(masks):
            if mask.shape != (ids.shape[0],):
                raise ValueError(f"layer {layer}: mask must be [{ids.shape[0]}], got {tuple(mask.shape)}")
        return cls(ids, torch.stack([m.bool().to(ids.device) for m in masks], dim=1))

    @property
    def num_layers(self) -> int:
        return self.ids.shape[1]

    @property
    def tokens(self) -> int:
        return self.ids.shape[0]

    @property
    def indices(self) -> list[torch.Tensor]:
        """Per layer ``[tokens, top_k]`` views (compact dtype, no copy)."""
        return [self.ids[:, layer] for layer in range(self.num_layers)]

    @property
    def masks(self) -> list[torch.Tensor]:
        """Per layer ``[tokens]`` views."""
        return [self.mask[:, layer] for layer in range(self.num_layers)]


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
        self._plan: RouterIndices | None = None
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
    def replaying(self, routing: RouterIndices | Sequence[torch.Tensor],
                  masks: Sequence[torch.Tensor] | None = None) -> Iterator[None]:
        """Forwards inside use ``routing``'s layer ``l`` at router ``l`` where its mask is True.
        ``routing`` is a ``RouterIndices`` (compact, on the model's device), or per-router
        ``[tokens, top_k]`` tensors with optional ``[tokens]`` masks (all tokens when None), as
        ``recording()`` yields them."""
        if not isinstance(routing, RouterIndices):
            routing = RouterIndices.from_layers(routing, masks)
        elif masks is not None:
            raise ValueError("RouterIndices carry their masks; pass no separate masks")
        self._plan = self._validated_plan(routing)
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

    def _validated_plan(self, routing: RouterIndices) -> RouterIndices:
        if routing.num_layers != self.num_layers:
            raise ValueError(f"replay needs {self.num_layers} layers (one per router), got {routing.num_layers}")
        if routing.ids.shape[2] != self.top_k:
            raise ValueError(f"replay indices must be [tokens, {self.num_layers}, {self.top_k}], "
                             f"got {tuple(routing.ids.shape)}")
        used = routing.ids[routing.mask]  # on the device: one pass over the compact ids
        if used.numel():
            low, high = int(used.min()), int(used.max())
            if low < 0 or high >= self.num_experts:
                raise ValueError(f"replayed expert ids must lie in 0..{self.num_experts - 1}, got {low}..{high}")
        return routing

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
            if self._plan.tokens != scores.shape[0]:
                raise ValueError(f"layer {layer}: {self._plan.tokens} replay rows for {scores.shape[0]} routed tokens")
            # Widened here, one layer at a time, on the device: gather and scatter need int64.
            target = self._plan.ids[:, layer].to(scores.device).long()
            mask = self._plan.mask[:, layer].to(scores.device)
            chosen = torch.where(mask[:, None], target, own)
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
                              device: torch.device | str = "cpu") -> RouterIndices:
    """Routing per sample (``rows[i]`` ``[r_i, L, K]`` covering sequence positions ``starts[i] ..``)
    -> ``RouterIndices`` on ``device`` in Megatron's sequence-major token order (row ``s * B + b``),
    masked where no row exists (the last token, padding, positions before ``start``, or rows the
    rollout did not record: ``valid[i]`` ``[r_i, L]`` False). Sample ``i`` sits in batch row ``i``
    at offset 0, or where ``placements[i] = (row, offset)`` says (packed batches).

    The ids keep their dtype (uint8 / int16 as received) all the way: only the compact rows cross
    to the device, where they are placed; the router widens one layer at a time."""
    if not rows:
        raise ValueError("no samples to place")
    placements = list(placements) if placements is not None else [(i, 0) for i in range(len(rows))]
    if len(placements) != len(rows) or len(starts) != len(rows) or (valid is not None and len(valid) != len(rows)):
        raise ValueError(f"{len(rows)} samples, {len(starts)} starts, {len(placements)} placements"
                         f"{'' if valid is None else f', {len(valid)} validity masks'}: one each")
    batch = 1 + max(row for row, _ in placements)
    _, layers, top_k = rows[0].shape
    dtype, device = rows[0].dtype, torch.device(device)
    for i, sample in enumerate(rows):
        if sample.dtype != dtype or sample.dtype not in _ID_DTYPES:
            raise ValueError(f"sample {i}: expert ids of dtype {sample.dtype}; all samples need one of "
                             f"{sorted(str(d) for d in _ID_DTYPES)} (sample 0 has {dtype})")
        if sample.shape[1:] != (layers, top_k):
            raise ValueError(f"sample {i}: rows of shape {tuple(sample.shape[1:])}, expected {(layers, top_k)}")
        if valid is not None and valid[i] is not None and valid[i].shape != sample.shape[:2]:
            raise ValueError(f"sample {i}: validity mask of shape {tuple(valid[i].shape)}, expected "
                             f"{tuple(sample.shape[:2])}")
        end = placements[i][1] + starts[i] + sample.shape[0]
        if end > seq_len:
            raise ValueError(f"sample {i}: rows reach position {end} beyond the batch's {seq_len} positions")
    ids = torch.zeros(seq_len, batch, layers, top_k, dtype=dtype, device=device)
    mask = torch.zeros(seq_len, batch, layers, dtype=torch.bool, device=device)
    given = [i for i in range(len(rows)) if valid is not None and valid[i] is not None]
    on_device = _to_device(rows, device)
    valid_on_device = dict(zip(given, _to_device([valid[i].bool() for i in given], device))) if given else {}
    for i, (sample, start, (b, offset)) in enumerate(zip(on_device, starts, placements)):
        begin = offset + start
        ids[begin : begin + sample.shape[0], b] = sample  # a strided device copy: row (s, b) is s * B + b
        mask[begin : begin + sample.shape[0], b] = valid_on_device.get(i, True)
    return RouterIndices(ids.view(seq_len * batch, layers, top_k), mask.view(seq_len * batch, layers))


def _to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """``tensors`` (one dtype) on ``device``. On CUDA they are gathered into one pinned host buffer
    and copied with one asynchronous transfer: received memory is pageable, and a pageable copy
    blocks the host per sample (the caching host allocator keeps the buffer alive until the copy
    is done). On the CPU they are returned as they are: no copy."""
    if device.type != "cuda":
        return [t.to(device) for t in tensors]
    sizes = [t.numel() for t in tensors]
    staged = torch.empty(sum(sizes), dtype=tensors[0].dtype, pin_memory=True)
    torch.cat([t.reshape(-1) for t in tensors], out=staged)
    flat = staged.to(device, non_blocking=True)
    return [chunk.view(t.shape) for chunk, t in zip(flat.split(sizes), tensors, strict=True)]


def rollout_indices_from_wire(samples: Sequence, seq_len: int, device: torch.device | str = "cpu") -> RouterIndices:
    """``rollout_to_router_indices`` for routing received over the wire (``RoutingSample``s in the
    batch's sample order): rows start at each record's ``start``; unrecorded rows stay masked. The
    received uint8 / int16 views go to ``device`` as they are."""
    for sample in samples:
        record = sample.record
        if record.layer_start != 0 or record.layer_stop != record.num_layers:
            raise ValueError(f"{record.key!r} carries layers [{record.layer_start}, {record.layer_stop}) only; "
                             f"a full model needs all {record.num_layers}")
    return rollout_to_router_indices([s.routing for s in samples], [s.record.start for s in samples], seq_len,
                                     [s.valid for s in samples], device=device)


class RecordedRouting:
    """R2's store: routing recorded in the old-policy forward, kept per sample key on the host in
    the wire's compact dtype (uint8 / int16), and re-assembled on the device for whatever
    micro-batches the update uses (other sizes, order, padding)."""

    def __init__(self, num_experts: int) -> None:
        from routing_replay.capture.layout import storage_dtype

        self.num_experts = num_experts
        self.dtype = storage_dtype(num_experts)
        self._rows: dict[str, torch.Tensor] = {}

    def add(self, keys: Sequence[str], recorded: Sequence[torch.Tensor], lengths: Sequence[int]) -> None:
        """``recorded[l]`` ``[S * B, K]`` from ``ModelReplay.recording()`` over a batch whose sample
        ``b`` has key ``keys[b]`` and ``lengths[b]`` real tokens. Narrowed where recorded (the
        device), so only compact ids cross to the host."""
        batch = len(keys)
        if len(lengths) != batch:
            raise ValueError(f"{batch} keys but {len(lengths)} lengths")
        stacked = torch.stack([r.view(-1, batch, r.shape[-1]) for r in recorded], dim=2)  # [S, B, L, K]
        if stacked.numel() and (int(stacked.min()) < 0 or int(stacked.max()) >= self.num_experts):
            raise ValueError(f"recorded expert ids {int(stacked.min())}..{int(stacked.max())} outside "
                             f"0..{self.num_experts - 1}")
        compact = stacked.to(self.dtype).transpose(0, 1).cpu()  # [B, S, L, K]: one host transfer per batch
        for b, (key, length) in enumerate(zip(keys, lengths)):
            self._rows[key] = compact[b, :length].clone()  # its own storage: the batch's padding is freed

    def indices_for(self, keys: Sequence[str], seq_len: int, device: torch.device | str = "cpu") -> RouterIndices:
        missing = [k for k in keys if k not in self._rows]
        if missing:
            raise KeyError(f"no recorded routing for {missing[:5]} ({len(missing)} sample(s))")
        return rollout_to_router_indices([self._rows[k] for k in keys], [0] * len(keys), seq_len, device=device)

    def clear(self) -> None:
        self._rows.clear()

    def __len__(self) -> int:
        return len(self._rows)
