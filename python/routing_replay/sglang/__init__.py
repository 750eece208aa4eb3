"""SGLang producer: ``--record-routing`` records routing at SGLang's MoE top-k and delivers it.

The only package that imports sglang. It enters SGLang through its plugin system alone (entry
point group ``sglang.srt.plugins``, hooks registered with ``HookRegistry``); nothing in SGLang is
patched on disk.

- ``options``: the server flags and the per-request parameters (``custom_params.routing_replay``).
- ``plugin``: ``register()``, the hooks, and which process acts on which.
- ``recording``: the scheduler-side state: staging + slot-keyed recorders, delivery, lifecycle.
- ``client``: helpers for clients: request parameters, the response descriptor, inline decoding.
- ``cpu_workarounds``: what SGLang needs on a machine without a GPU (applied only there).
"""
