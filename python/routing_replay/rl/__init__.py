"""The RL algorithm as pure torch functions (no Ray, no SGLang, no Megatron), one concept each.

The token-level surrogate of the seed: sum_t [pi_theta(y_t) / mu_old(y_t)] * A, written as
(pi_old / mu_old) x (pi_theta / pi_old) = mismatch factor x staleness factor.

- ``advantages``: group-normalised advantages (GRPO).
- ``corrections``: train-inference correction of the mismatch factor (truncated or masked IS, at
  token, sequence or geometric level).
- ``objective``: the token-level loss with PPO-style clipping of the staleness factor.
- ``metrics``: mergeable statistics of a log ratio (``RatioStats``: moments, quantiles, k1/k3 KL,
  shares beyond tau or outside bounds) and of a mini-batch (``MiniBatchStats``), exact over
  micro-batches and ranks.
- ``minibatch``: one mini-batch's loss and the statistics of both factors and their product.
- ``identity``: the token-level gradient against the sequence-level one as ratios leave 1.
- ``rollout_batch``: a rollout sample (exact token ids, mu_old) and its tensors at log-prob positions.
"""
