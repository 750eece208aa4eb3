"""routing-replay: reinforcement learning for Mixture-of-Experts LLMs with routing replay.

The packages follow the data flow, and each imports only what lies upstream of it:

- ``capture``: records compact top-k expert ids per layer into preallocated buffers (native
  C++/CUDA kernels); needs torch only.
- ``wire``: moves recorded routing from the inference engine to the trainer ranks.
- ``sglang``: the SGLang plugin (producer); ``megatron``: replay in Megatron (consumer);
  ``rl``: the algorithm (pure torch); ``orchestration``: the Ray job.

Importing this package imports none of them.
"""

__version__ = "0.1.0"
