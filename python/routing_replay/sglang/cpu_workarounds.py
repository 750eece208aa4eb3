"""SGLang on a machine without a GPU (each piece applies only when torch sees no CUDA device).

- ``apply()``, called once per SGLang process by the plugin's ``register()`` (its only caller):
  SGLang's own ``--enable-return-routed-experts`` allocates its host buffer with CUDA host
  registration, which fails on CPU; device "cpu" gets a plain allocator. Only SGLang's own capture (which our tests
  compare against) needs it; our recorder does not.
- ``apply()`` also gives Qwen2-MoE's shared-expert gate (a Triton kernel SGLang calls on every
  device) a plain-torch version for CPU tensors.
- ``server_flags()`` / ``server_env()``: the CPU engine's launch flags and environment.

What ``apply()`` replaces is listed in ``routing_replay.integration_surface`` (checked by its test).
"""

from __future__ import annotations

import torch


def apply() -> None:
    """Nothing where torch sees a GPU."""
    if torch.cuda.is_available():
        return
    from sglang.srt.mem_cache.pool_host import common

    def plain_cpu_alloc(dims, dtype, device, pin_memory, allocator=None, registration_granularity_bytes=None):
        return torch.empty(dims, dtype=dtype, device=device)

    common.ALLOC_MEMORY_FUNCS["cpu"] = plain_cpu_alloc

    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register("sglang.kernels.ops.elementwise.elementwise.fused_gate_sigmoid_mul_add",
                          _gate_sigmoid_mul_add_on_cpu, HookType.AROUND)


def _gate_sigmoid_mul_add_on_cpu(original, hidden_states, gate_weight, shared_output, final_hidden_states):
    """final += sigmoid(hidden . gate) * shared, as the Triton kernel computes it."""
    if hidden_states.is_cuda:
        return original(hidden_states, gate_weight, shared_output, final_hidden_states)
    gate = torch.sigmoid(hidden_states.float() @ gate_weight.float()).unsqueeze(-1)
    final_hidden_states += (gate * shared_output.float()).to(final_hidden_states.dtype)


# The CPU engine: plain-torch attention and sampling, no CUDA graphs, no overlap thread, and an
# idle scheduler that sleeps instead of spinning a core. Added only where there is no GPU.
_CPU_FLAGS = ("--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch",
              "--cuda-graph-backend-decode", "disabled", "--cuda-graph-backend-prefill", "disabled",
              "--disable-overlap-schedule", "--sleep-on-idle")


def server_flags() -> tuple[str, ...]:
    return () if torch.cuda.is_available() else _CPU_FLAGS


def server_env() -> dict[str, str]:
    return {} if torch.cuda.is_available() else {"SGLANG_USE_CPU_ENGINE": "1"}
