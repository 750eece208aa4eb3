"""The RL step's guards, without a cluster: R3 refuses thin routing coverage and routing recorded
under other weights, responses must line up token by token, and an engine refuses log-probs taken
before temperature."""

from types import SimpleNamespace

import pytest
import torch

from routing_replay.megatron.logprobs import Batch
from routing_replay.orchestration import engines
from routing_replay.orchestration.trainer import ReplayCoverageError, StaleRoutingError, TrainerRank
from routing_replay.rl.rollout_batch import Sample
from routing_replay.rl.step_stats import StepStats
from routing_replay.wire import RoutingCollector, RoutingRecord, RoutingSender, SenderConfig, token_hash


def trainer(replay: str, min_coverage: float) -> TrainerRank:
    rank = TrainerRank()
    rank.spec = SimpleNamespace(replay=replay, min_replay_coverage=min_coverage)
    return rank


def masks_missing(batch: Batch, row: int, position: int, layers: int = 2) -> torch.Tensor:
    """A [S * B, layers] (sequence-major) replay mask, True everywhere but one (row, position) in layer 1."""
    seq_len, rows = batch.tokens.shape[1], batch.tokens.shape[0]
    mask = torch.ones(seq_len * rows, layers, dtype=torch.bool)
    mask[position * rows + row, 1] = False
    return mask


def test_r3_refuses_a_micro_batch_below_the_coverage_floor_naming_sample_and_position():
    micro = [SimpleNamespace(key="s0-p0-g0"), SimpleNamespace(key="s0-p0-g1")]
    batch = Batch.from_sequences([[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]])
    stats = StepStats()
    with pytest.raises(ReplayCoverageError, match=r"0\.8750 .* s0-p0-g1: positions \[2\]"):
        trainer("R3", 1.0)._count_coverage(micro, batch, masks_missing(batch, row=1, position=2), stats)
    # A floor below the coverage lets it through, and the share is counted either way.
    stats = StepStats()
    trainer("R3", 0.8)._count_coverage(micro, batch, masks_missing(batch, row=1, position=2), stats)
    assert stats.flat()["routing/coverage"] == pytest.approx(7 / 8)
    # The last token cannot reach the loss: no row there is no gap.
    trainer("R3", 1.0)._count_coverage(micro, batch, masks_missing(batch, row=0, position=4), StepStats())
    # Outside R3 the rollout routing only feeds the diagnostics: counted, never refused.
    trainer("none", 1.0)._count_coverage(micro, batch, masks_missing(batch, row=1, position=2), StepStats())


def test_routing_recorded_under_other_weights_is_refused_naming_samples_and_versions():
    """Real sender and collector on loopback: two samples sampled with 'step-3', one of whose
    routing was recorded under 'step-2' (an engine that missed the weight update)."""
    samples = [Sample(f"s3-p0-g{i}", (5, 6, 7), (8, 9), (-0.5, -1.5)) for i in range(2)]
    with RoutingCollector() as collector, RoutingSender(SenderConfig(ack_timeout_s=1.0, heartbeat_s=0.2)) as sender:
        for sample, version in zip(samples, ("step-3", "step-2")):
            routing = torch.zeros(len(sample.token_ids) - 1, 2, 2, dtype=torch.uint8)
            record = RoutingRecord.of(sample.key, routing, None, num_experts=8, num_tokens=len(sample.token_ids),
                                      token_hash=token_hash(sample.token_ids), weight_version=version)
            sender.send(record, routing, collector.address)
        rank = TrainerRank()
        rank.spec = SimpleNamespace(replay="R3", paired_diagnostics=False, routing_timeout=10.0)
        rank.collector = collector
        with pytest.raises(StaleRoutingError, match=r"sampled with weight version 'step-3'.* 1 sample\(s\) is stale: "
                                                    r"1 recorded under 'step-2' \(s3-p0-g1\)"):
            rank.old_logprobs(samples, "step-3")


def test_log_probs_must_belong_to_the_output_tokens():
    response = {"output_ids": [5, 6, 7], "meta_info": {"output_token_logprobs": [[-0.1, 5, "a"], [-0.2, 6, "b"],
                                                                                  [-0.3, 7, "c"]]}}
    assert engines.response_logprobs(0, "k", response) == (-0.1, -0.2, -0.3)
    shifted = {**response, "meta_info": {"output_token_logprobs": [[-0.1, 6, "b"], [-0.2, 7, "c"],
                                                                   [-0.3, 5, "a"]]}}
    with pytest.raises(engines.EngineResponseError, match="position 0 is of token 6, the output has 5"):
        engines.response_logprobs(0, "k", shifted)
    short = {**response, "meta_info": {"output_token_logprobs": [[-0.1, 5, "a"]]}}
    with pytest.raises(engines.EngineResponseError, match="1 log-probs for 3 output tokens"):
        engines.response_logprobs(0, "k", short)


@pytest.mark.parametrize("value", ["1", "true", "True"])
def test_an_engine_refuses_log_probs_before_temperature(monkeypatch, value):
    monkeypatch.setenv(engines.ORIGINAL_LOGPROB_ENV, value)
    with pytest.raises(engines.EngineConfigError, match="SGLANG_RETURN_ORIGINAL_LOGPROB is set"):
        engines.RolloutEngine(SimpleNamespace(model_path="unused", weight_version="init"))


def test_engines_seed_sglang_sampling_unless_the_config_does():
    spec = engines.EngineSpec(1, "/m", "/logs", ("--skip-server-warmup",), seed=7)
    assert engines.server_args(spec, "step-3") == ["--record-routing", "--dtype", "float32", "--weight-version", "step-3",
                                           "--skip-server-warmup", "--random-seed", "7"]
    for given in (("--random-seed", "5"), ("--random-seed=5",)):
        args = engines.server_args(engines.EngineSpec(0, "/m", "/logs", given, record_routing=False), "init")
        assert args.count("--random-seed") + args.count("--random-seed=5") == 1 and args[0] == "--dtype"
