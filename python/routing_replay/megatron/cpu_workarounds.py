"""megatron-core on a machine without CUDA: every piece applies only when torch sees no GPU.

``apply()`` is idempotent and does nothing where there is a GPU; a process that runs megatron-core
calls it once at its start. Every attribute it replaces is listed in ``routing_replay.integration_surface``.

- RoPE and router gating call ``torch.cuda.current_device()``: it returns "cpu".
- The alltoall token dispatcher uses CUDA streams, pipeline p2p synchronises the device: a
  do-nothing stream and synchronize stand in.
- megatron-core 0.16 without TransformerEngine references ``moe_utils.te_general_gemm``, which is
  only defined when TransformerEngine imports: it is set to None.
- ``model_parallel_cuda_manual_seed`` needs CUDA: the RNG tracker is initialised without it.
- Sequence parallelism: the plain-torch norm (no Apex/TE on CPU) refuses ``sequence_parallel``;
  a norm is per token, so it is built from a config copy without it and its weights are marked
  ``sequence_parallel`` (their gradients are summed over the tensor-parallel group).
- Activation recompute saves and restores the CUDA RNG state around each checkpointed block: on
  CPU the CPU generator's state stands in.
- Expert parallelism with the alltoall dispatcher: split sizes reach ``all_to_all_single`` as
  tensors on CPU, which torch's gloo binding rejects; they are turned into lists.
- megatron-core's optimizers (mixed precision, distributed, gradient clipping) create scalars with
  ``device="cuda"``, call ``Tensor.cuda()`` and test ``param.type()`` for ``torch.cuda.*Tensor``:
  their entry points run under ``_CudaOnCpu``, which sends such factory calls to the CPU, makes
  ``.cuda()`` the identity and reports CPU float tensors under their CUDA type names.
"""

from __future__ import annotations

import contextlib

import torch

_applied = False


class _NoStream:
    """Stands in for torch.cuda.Stream on CPU: one instance, every operation a no-op."""

    _instance = None

    def __new__(cls, *args, **kwargs):
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def wait_stream(self, *args, **kwargs) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def record_event(self, *args, **kwargs):
        return self


def apply() -> None:
    global _applied
    if _applied or torch.cuda.is_available():
        return
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.Stream = _NoStream
    torch.cuda.current_stream = lambda *args, **kwargs: _NoStream()
    torch.cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    torch.cuda.synchronize = lambda *args, **kwargs: None  # pipeline p2p syncs the device after sends
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _allow_sequence_parallel_torch_norm()
    _all_to_all_with_list_splits()
    _cpu_rng_state_for_recompute()
    _optimizers_on_cpu()
    _applied = True


def _cpu_rng_state_for_recompute() -> None:
    from megatron.core.tensor_parallel import random as mp_random

    mp_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def _allow_sequence_parallel_torch_norm() -> None:
    import dataclasses

    from megatron.core.transformer import torch_norm

    build = torch_norm.WrappedTorchNorm.__new__

    def new(cls, config, *args, **kwargs):
        sequence_parallel = config.sequence_parallel
        norm = build(cls, dataclasses.replace(config, sequence_parallel=False) if sequence_parallel else config,
                     *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = sequence_parallel
        return norm

    torch_norm.WrappedTorchNorm.__new__ = staticmethod(new)


def _all_to_all_with_list_splits() -> None:
    import torch.distributed as dist

    original = dist.all_to_all_single

    def as_list(sizes):
        return sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None, async_op=False):
        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), group=group,
                        async_op=async_op)

    dist.all_to_all_single = all_to_all_single


def _is_cuda(device: object) -> bool:
    return (isinstance(device, torch.device) and device.type == "cuda") or (
        isinstance(device, str) and device.startswith("cuda"))


_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.bfloat16: "torch.cuda.BFloat16Tensor",
                    torch.float16: "torch.cuda.HalfTensor"}


class _CudaOnCpu(torch.overrides.TorchFunctionMode):
    """What megatron-core's optimizers need: CUDA factory calls on the CPU, ``.cuda()`` the
    identity, and ``Tensor.type()`` naming CPU float tensors as CUDA ones (the optimizers sort
    parameters into fp16/bf16/fp32 groups by that name)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.type and len(args) == 1 and not kwargs and args[0].dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[args[0].dtype]
        if func is torch.Tensor.cuda:
            return args[0]
        if _is_cuda(kwargs.get("device")):
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def _optimizers_on_cpu() -> None:
    import functools

    from megatron.core.optimizer import distrib_optimizer, optimizer

    def on_cpu(method):
        @functools.wraps(method)
        def wrapped(*args, **kwargs):
            with _CudaOnCpu():
                return method(*args, **kwargs)

        return wrapped

    # __init__: CUDA scalars and param.type(); step: clip_grads' and the L2 norm's CUDA tensors;
    # (sharded_)state_dict / load_state_dict: the distributed optimizer's .cuda() buffers.
    for cls in (optimizer.MegatronOptimizer, optimizer.MixedPrecisionOptimizer,
                optimizer.Float16OptimizerWithFloat16Params, optimizer.FP32Optimizer,
                optimizer.ChainedOptimizer, distrib_optimizer.DistributedOptimizer):
        for name in ("__init__", "step", "sharded_state_dict", "load_state_dict"):
            if name in vars(cls):
                setattr(cls, name, on_cpu(vars(cls)[name]))


def seed_rng(seed: int) -> None:
    """Model-parallel RNG state: megatron's CUDA seeding on a GPU, a CPU tracker otherwise."""
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mp_random.model_parallel_cuda_manual_seed(seed)
    else:
        mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
