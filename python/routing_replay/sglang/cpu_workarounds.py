"""SGLang on a machine without a GPU (applied only when torch sees no CUDA device).

SGLang's own ``--enable-return-routed-experts`` allocates its host buffer with CUDA host
registration, which fails on CPU; give device "cpu" a plain allocator. This only matters for
SGLang's own capture, which our tests compare against; our recorder does not use it.
"""

from __future__ import annotations

import torch


def apply() -> None:
    if torch.cuda.is_available():
        return
    from sglang.srt.mem_cache.pool_host import common

    def plain_cpu_alloc(dims, dtype, device, pin_memory, allocator=None, registration_granularity_bytes=None):
        return torch.empty(dims, dtype=dtype, device=device)

    common.ALLOC_MEMORY_FUNCS["cpu"] = plain_cpu_alloc
