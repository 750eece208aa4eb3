"""SchedulerRecording without a server: layer mapping, staging, per-forward copy, lifecycle.

The real-server behaviour is in tests/integration/test_sglang_recording.py; this pins the pieces
SGLang cannot exercise on CPU (dense layers: SGLang 0.5.23's Qwen MoE models ignore mlp_only_layers).
"""

from types import SimpleNamespace

import pytest
import torch

from routing_replay.sglang.options import RecordingOptions, RoutingRequest, RoutingRequestError
from routing_replay.sglang.recording import SchedulerRecording

CONFIG = SimpleNamespace(num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, mlp_only_layers=[0, 2])


def recording() -> SchedulerRecording:
    return SchedulerRecording(RecordingOptions(record_routing=True), CONFIG, num_slots=64, max_batch=16,
                              device="cpu", sends=False)


def forward(rec: SchedulerRecording, slots: list[int], per_layer: dict[int, torch.Tensor], padded: int = 0):
    batch = SimpleNamespace(out_cache_loc=torch.tensor(slots), out_cache_loc_virtual=None,
                            num_token_non_padded=None)

    def run():
        for layer_id, ids in per_layer.items():
            rows = torch.cat([ids, torch.randint(0, 8, (padded, 2))]) if padded else ids  # garbage padding rows
            rec.capture(layer_id, rows)

    rec.run_forward(batch, run)


def test_rows_map_to_routers_by_layer_index_on_a_model_with_dense_layers():
    rec = recording()
    assert rec.layout.num_layers == 2 and rec.router_of_layer == {1: 0, 3: 1}
    ids1, ids3 = torch.tensor([[0, 1], [2, 3]]), torch.tensor([[4, 5], [6, 7]])
    forward(rec, [10, 11], {1: ids1, 3: ids3}, padded=3)
    rows = rec.main.gather([10, 11]).wait()
    assert rows.complete
    assert torch.equal(rows.ids[:, 0].long(), ids1) and torch.equal(rows.ids[:, 1].long(), ids3)
    with pytest.raises(RuntimeError, match="layer 2 routed tokens but the model config says its MoE layers are \\[1, 3\\]"):
        forward(rec, [12], {2: ids1[:1]})


def test_staging_is_cleared_between_forwards_and_grows_for_large_eager_batches():
    rec = recording()
    forward(rec, [1, 2], {1: torch.tensor([[0, 1], [2, 3]]), 3: torch.tensor([[0, 1], [2, 3]])})
    forward(rec, [5, 6], {1: torch.tensor([[4, 5], [6, 7]])})  # layer 3 not routed in this forward
    assert rec.main.gather([5, 6]).wait().valid.tolist() == [[True, False], [True, False]]
    big = list(range(20, 60))
    forward(rec, big, {1: torch.zeros(40, 2, dtype=torch.int64), 3: torch.ones(40, 2, dtype=torch.int64)})
    assert rec.staging.num_slots == 40 and rec.main.gather(big).wait().complete


def test_freed_slots_and_weight_changes_drop_rows():
    rec = recording()
    forward(rec, [1, 2], {1: torch.tensor([[0, 1], [2, 3]]), 3: torch.tensor([[0, 1], [2, 3]])})
    rec.slots_freed(torch.tensor([1]))
    assert rec.main.gather([1, 2]).wait().valid.all(1).tolist() == [False, True]
    rec.weights_changed()
    assert not rec.main.gather([2]).wait().valid.any()


def test_capture_outside_a_forward_is_ignored():
    rec = recording()
    rec.capture(1, torch.tensor([[0, 1]]))  # e.g. the draft model or a warm-up outside ModelRunner.forward
    assert not rec.staging.gather(range(16)).wait().valid.any()


@pytest.mark.parametrize(
    ("custom", "expected"),
    [(None, None), ({}, None), ({"routing_replay": False}, None), ({"routing_replay": True}, RoutingRequest()),
     ({"routing_replay": {"key": "k", "start_len": 3, "inline": True}}, RoutingRequest("k", 3, None, True))],
)
def test_request_parameters(custom, expected):
    assert RoutingRequest.from_custom_params(custom) == expected


@pytest.mark.parametrize("bad", [{"routing_replay": 1}, {"routing_replay": {"key": ""}},
                                 {"routing_replay": {"start_len": True}}, {"routing_replay": {"inline": "yes"}},
                                 {"routing_replay": {"sink": "localhost:5"}}, {"routing_replay": {"x": 1}}])
def test_bad_request_parameters_name_the_field(bad):
    with pytest.raises(RoutingRequestError, match="custom_params.routing_replay"):
        RoutingRequest.from_custom_params(bad)


def test_routing_is_recorded_into_cuda_graphs_captured_outside_forwards(monkeypatch):
    """SGLang captures CUDA graphs by calling the model directly (no ModelRunner.forward); the
    per-layer record must still be captured, with every row (padding is dropped at copy time)."""
    import routing_replay.sglang.recording as recording_module

    rec = recording()
    monkeypatch.setattr(recording_module, "_capturing_cuda_graph", lambda: True)
    rec.capture(1, torch.tensor([[0, 1], [2, 3], [4, 5]]))  # e.g. a padded graph batch of 3
    staged = rec.staging.gather([0, 1, 2]).wait()
    assert staged.valid[:, 0].tolist() == [True, True, True]
    monkeypatch.setattr(recording_module, "_capturing_cuda_graph", lambda: False)
    rec.capture(1, torch.tensor([[6, 7]]))  # outside capture and outside a forward: ignored
    assert rec.staging.gather([0]).wait().ids[0, 0].tolist() == [0, 1]
