"""Mergeable ratio statistics against numpy references and hand-computed values, and the
mini-batch's metrics built from them."""

import math
import pickle

import numpy as np
import pytest
import torch

from routing_replay.rl import corrections, objective
from routing_replay.rl.metrics import MiniBatchStats, RatioStats, mini_batch_metrics
from routing_replay.rl.minibatch import loss_and_metrics

SUMMARY_KEYS = ["tokens", "mean", "mean_abs", "std", "p50", "p90", "p99", "max", "k1", "k3", "beyond_2", "beyond_5"]
QUANTILE_RESOLUTION = 10 ** (1 / 40)  # the histogram's documented relative resolution


def _reference(log_ratio: np.ndarray, bounds: dict[str, tuple[float, float]]) -> dict[str, float]:
    x = log_ratio.astype(np.float64)
    return {
        "tokens": float(x.size), "mean": x.mean(), "mean_abs": np.abs(x).mean(), "std": x.std(),
        **{f"p{round(q * 100)}": np.quantile(np.abs(x), q, method="inverted_cdf") for q in (0.5, 0.9, 0.99)},
        "max": np.abs(x).max(), "k1": -x.mean(), "k3": (np.expm1(x) - x).mean(),
        "beyond_2": (np.abs(x) > math.log(2)).mean(), "beyond_5": (np.abs(x) > math.log(5)).mean(),
        **{f"outside_{name}": ((x < math.log(lo)) | (x > math.log(hi))).mean() for name, (lo, hi) in bounds.items()},
    }


def _assert_matches(summary: dict[str, float], reference: dict[str, float]) -> None:
    assert list(summary) == list(reference)
    for key, expected in reference.items():
        if key in ("p50", "p90", "p99"):
            assert expected / QUANTILE_RESOLUTION <= summary[key] <= expected * QUANTILE_RESOLUTION, key
        elif key.startswith(("beyond", "outside", "tokens")) or key == "max":
            assert summary[key] == expected, key  # counts and the max are exact
        else:
            assert summary[key] == pytest.approx(expected, rel=1e-9, abs=1e-15), key


@pytest.mark.parametrize("seed", range(3))
def test_ratio_stats_against_numpy(seed):
    gen = torch.Generator().manual_seed(seed)
    scale = 10 ** (torch.rand(40, 50, generator=gen) * 7 - 6)  # |log r| from ~1e-6 to ~10
    log_ratio = torch.randn(40, 50, generator=gen) * scale
    log_ratio[0, :5] = 0.0  # exact zeros land in the underflow bin
    mask = torch.rand(40, 50, generator=gen) < 0.7
    log_ratio[~mask] = float("inf")  # padding never reaches a statistic
    bounds = {"clip": (0.8, 1.28), "correction": (0.5, 2.0)}
    summary = RatioStats.from_log_ratio(log_ratio, mask, bounds).summary()
    assert list(summary)[: len(SUMMARY_KEYS)] == SUMMARY_KEYS
    _assert_matches(summary, _reference(log_ratio[mask].numpy(), bounds))


# Two data-parallel ranks, two micro-batches each; padding holds junk.
RANK0_MICRO0 = (torch.tensor([[0.1, -0.2, 9.0], [0.3, 0.0, 0.0]]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
RANK0_MICRO1 = (torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 1]]))
RANK1_MICRO0 = (torch.tensor([[2.0, 0.5, -7.0]]), torch.tensor([[1, 1, 0]]))
RANK1_MICRO1 = (torch.tensor([[-0.4]]), torch.tensor([[1]]))
MICRO_BATCHES = [RANK0_MICRO0, RANK0_MICRO1, RANK1_MICRO0, RANK1_MICRO1]
ALL_TOKENS = [0.1, -0.2, 0.3, 1.0, -1.0, 2.0, 0.5, -0.4]
CLIP = {"clip": (0.8, 1.28)}  # log bounds -0.223, 0.247


def test_two_ranks_two_micro_batches_merge_exactly_by_hand():
    ranks = [sum((RatioStats.from_log_ratio(x, m, CLIP) for x, m in micro_batches), RatioStats.empty())
             for micro_batches in (MICRO_BATCHES[:2], MICRO_BATCHES[2:])]
    driver = sum((pickle.loads(pickle.dumps(rank)) for rank in ranks), RatioStats.empty())  # as Ray carries them
    summary = driver.summary()
    # 8 tokens; sum 2.3; sum |.| 5.5; sum of squares 6.55
    assert summary["tokens"] == 8
    assert summary["mean"] == pytest.approx(2.3 / 8) and summary["k1"] == pytest.approx(-2.3 / 8)
    assert summary["mean_abs"] == pytest.approx(5.5 / 8)
    assert summary["std"] == pytest.approx(math.sqrt(6.55 / 8 - (2.3 / 8) ** 2))
    assert summary["k3"] == pytest.approx(sum(math.exp(x) - 1 - x for x in ALL_TOKENS) / 8)
    assert summary["max"] == pytest.approx(2.0)
    assert summary["beyond_2"] == 3 / 8  # 1.0, -1.0, 2.0 beyond log 2 = 0.693
    assert summary["beyond_5"] == 1 / 8  # 2.0 beyond log 5 = 1.609
    assert summary["outside_clip"] == 6 / 8  # all but 0.1 and -0.2
    # sorted |log r|: 0.1 0.2 0.3 0.4 0.5 1 1 2; p50 is the 4th, p90 and p99 the 8th
    assert 0.4 / QUANTILE_RESOLUTION <= summary["p50"] <= 0.4 * QUANTILE_RESOLUTION
    assert summary["p90"] == summary["p99"] == pytest.approx(2.0, rel=QUANTILE_RESOLUTION - 1)

    all_at_once = torch.tensor(ALL_TOKENS)
    assert summary == pytest.approx(RatioStats.from_log_ratio(all_at_once, torch.ones(8), CLIP).summary())

    # The unweighted mean of per-micro-batch means (0.6/3, 2/2, 2.5/2, 0.4/1) is not the mean.
    per_micro = [RatioStats.from_log_ratio(x, m).summary()["mean_abs"] for x, m in MICRO_BATCHES]
    assert per_micro == pytest.approx([0.2, 1.0, 1.25, 0.4])
    assert sum(per_micro) / 4 == pytest.approx(0.7125)  # against 5.5 / 8 = 0.6875


def test_stats_pickle_and_empty_stats_raise():
    stats = RatioStats.from_log_ratio(*RANK0_MICRO0, CLIP)
    assert pickle.loads(pickle.dumps(stats)) == stats
    assert stats + RatioStats.empty() == stats == RatioStats.empty() + stats
    with pytest.raises(ValueError, match="no valid tokens"):
        RatioStats.empty().summary()
    with pytest.raises(ValueError, match="no valid tokens"):
        RatioStats.from_log_ratio(torch.ones(2, 3), torch.zeros(2, 3)).summary()
    with pytest.raises(ValueError, match="cannot merge"):
        stats + RatioStats.from_log_ratio(*RANK0_MICRO1)


def test_ratio_stats_of_huge_log_ratios_stay_finite():
    """exp(100) overflows float32; the stats compute in float64."""
    summary = RatioStats.from_log_ratio(torch.tensor([100.0, -100.0, 0.0]), torch.ones(3)).summary()
    assert summary["k3"] == pytest.approx((math.exp(100) - 101 + math.exp(-100) + 99) / 3)
    assert summary["max"] == 100.0 and summary["mean"] == 0.0 and summary["beyond_5"] == 2 / 3
    assert summary["p99"] == 100.0  # a bin's centre is capped at the max
    beyond_the_histogram = RatioStats.from_log_ratio(torch.tensor([2000.0]), torch.ones(1)).summary()
    assert beyond_the_histogram["p50"] == 2000.0  # the overflow bin reads the max
    assert beyond_the_histogram["k3"] == math.inf  # e^2000 exceeds float64: honestly infinite


def test_a_ratio_equal_to_a_bound_is_inside_it():
    log_ratio = torch.log(torch.tensor([2.0, 0.5, 5.0]))  # float32 logs: a hair off log 2, log 0.5, log 5
    bounds = {"correction": (0.5, 2.0), "unbounded": (0.0, math.inf)}  # a lower bound <= 0 is none
    summary = RatioStats.from_log_ratio(log_ratio, torch.ones(3), bounds).summary()
    assert summary["beyond_2"] == 1 / 3 and summary["beyond_5"] == 0.0 and summary["outside_correction"] == 1 / 3
    assert summary["outside_unbounded"] == 0.0


def _mini_batch():
    mask = torch.tensor([[True, True, False], [True, False, False]])
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9], [0.3, 0.5, 0.5]]))
    rollout = torch.log(torch.tensor([[0.25, 0.2, 0.1], [0.1, 0.5, 0.5]]))  # rho = 2, 1, 3 (a padded 9)
    theta = torch.log(torch.tensor([[0.6, 0.2, 0.9], [0.3, 0.5, 0.5]])).requires_grad_()  # staleness 1.2, 1, 1
    return theta, old, rollout, torch.tensor([1.0, -1.0]), mask


def test_mini_batch_metrics_by_hand():
    theta, old, rollout, adv, mask = _mini_batch()
    correction = corrections.Correction("truncate", "token", upper=1.5, lower=0.5)
    loss, stats = loss_and_metrics(theta, old, rollout, adv, mask, objective.Clip(0.1, 0.1), correction)
    # w = min(rho, 1.5) = 1.5, 1, 1.5; token 0: s = 1.2 clipped to 1.1 (A > 0); token 2: A < 0, s = 1
    assert float(loss.detach()) == pytest.approx(-(1.5 * 1.1 + 1.0 - 1.5) / 3)
    metrics = mini_batch_metrics(3, stats)
    factor_keys = [f"{factor}/mb3/{key}" for factor in ("mismatch", "staleness", "ratio") for key in SUMMARY_KEYS]
    assert set(metrics) == {*factor_keys, "mismatch/mb3/outside_correction", "staleness/mb3/outside_clip",
                            "clip_fraction/mb3", "correction/mb3/weight_mean", "correction/mb3/changed",
                            "correction/mb3/capped", "loss/mb3"}
    assert metrics["loss/mb3"] == pytest.approx(float(loss.detach()))
    assert metrics["clip_fraction/mb3"] == pytest.approx(1 / 3)
    assert metrics["correction/mb3/weight_mean"] == pytest.approx(4 / 3)
    assert metrics["correction/mb3/changed"] == pytest.approx(2 / 3)  # tokens 0 and 2 were truncated
    assert metrics["correction/mb3/capped"] == 0.0
    assert metrics["mismatch/mb3/mean_abs"] == pytest.approx((math.log(2) + math.log(3)) / 3)
    assert metrics["mismatch/mb3/outside_correction"] == pytest.approx(2 / 3)  # rho = 2, 3 above 1.5
    assert metrics["staleness/mb3/mean_abs"] == pytest.approx(math.log(1.2) / 3, rel=1e-5)
    assert metrics["staleness/mb3/outside_clip"] == pytest.approx(1 / 3)
    assert metrics["ratio/mb3/mean_abs"] == pytest.approx((math.log(2.4) + math.log(3)) / 3, rel=1e-5)
    assert metrics["mismatch/mb3/beyond_2"] == pytest.approx(1 / 3)  # 3; |log 2| is not beyond log 2
    loss.backward()
    assert theta.grad[0, 0] == 0 and theta.grad[0, 1] != 0  # the clipped token passes no gradient


def test_mini_batch_stats_merge_over_micro_batches_and_pickle():
    theta, old, rollout, adv, mask = _mini_batch()
    args = (objective.Clip(0.1, 0.1), corrections.Correction("mask", "sequence", upper=4.0, lower=0.5), 3)
    whole = loss_and_metrics(theta, old, rollout, adv, mask, *args)[1]
    rows = [loss_and_metrics(theta[i : i + 1], old[i : i + 1], rollout[i : i + 1], adv[i : i + 1],
                             mask[i : i + 1], *args)[1] for i in range(2)]
    merged = sum((pickle.loads(pickle.dumps(row)) for row in rows), MiniBatchStats.empty())
    assert mini_batch_metrics(0, merged) == pytest.approx(mini_batch_metrics(0, whole))
    with pytest.raises(ValueError, match="no valid tokens"):
        mini_batch_metrics(0, MiniBatchStats.empty())
