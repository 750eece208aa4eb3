"""Megatron consumer: megatron-core models built from Hugging Face MoE checkpoints, per-token
log-probs, and routing replay (R2/R3) through megatron-core's own RouterReplay.

The only package that imports megatron.core.

- ``cpu_workarounds``: what megatron-core needs on a machine without CUDA (applied only there).
- ``parallel``: process groups for TP/EP/PP from a config.
- ``hf_checkpoint``: HF config -> TransformerConfig + GPTModel; HF weights in, HF weights out.
- ``learner``: the optimisation on megatron-core's DDP, optimizer, schedule and dist checkpoints.
- ``torch_adam_fixes``: the distributed optimizer's checkpoints where torch Adam replaces FusedAdam.
- ``logprobs``, ``replay``, ``paired``: scoring, R2/R3 replay, routing comparisons.
"""
