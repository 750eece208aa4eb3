"""megatron-core on a machine without CUDA: every piece applies only when torch sees no GPU.

- RoPE and router gating call ``torch.cuda.current_device()``: it returns "cpu".
- The alltoall token dispatcher uses CUDA streams: a do-nothing stream stands in.
- megatron-core 0.16 without TransformerEngine references ``moe_utils.te_general_gemm``, which is
  only defined when TransformerEngine imports: it is set to None.
- ``model_parallel_cuda_manual_seed`` needs CUDA: the RNG tracker is initialised without it.
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
    import megatron.core.transformer.moe.moe_utils as moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _applied = True


def seed_rng(seed: int) -> None:
    """Model-parallel RNG state: megatron's CUDA seeding on a GPU, a CPU tracker otherwise."""
    from megatron.core.tensor_parallel import random as mp_random

    torch.manual_seed(seed)
    if torch.cuda.is_available():
        mp_random.model_parallel_cuda_manual_seed(seed)
    else:
        mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
