"""The RL algorithm as pure torch functions (no Ray, no SGLang, no Megatron), one concept each.

The token-level surrogate of the seed: sum_t [pi_theta(y_t) / mu_old(y_t)] * A, written as
(pi_old / mu_old) x (pi_theta / pi_old) = mismatch factor x staleness factor.

- ``advantages``: group-normalised advantages (GRPO).
- ``corrections``: train-inference correction of the mismatch factor (truncated or masked IS, at
  token, sequence or geometric level).
- ``objective``: the token-level loss with PPO-style clipping of the staleness factor.
- ``metrics``: statistics of either factor (mean |log ratio|, k3 KL, fraction beyond tau).
- ``minibatch``: one mini-batch's loss and the statistics of both factors.
- ``rollout_batch``: a rollout sample (exact token ids, mu_old) and its tensors at log-prob positions.
"""
