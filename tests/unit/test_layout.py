import pytest
import torch

from routing_replay.capture import InvalidRoutingInput, RoutingLayout


@pytest.mark.parametrize(
    ("experts", "dtype", "itemsize"),
    [(8, torch.uint8, 1), (128, torch.uint8, 1), (256, torch.uint8, 1), (257, torch.int16, 2), (512, torch.int16, 2)],
)
def test_smallest_dtype_that_holds_every_expert_id(experts, dtype, itemsize):
    layout = RoutingLayout(num_layers=4, top_k=2, num_experts=experts)
    assert layout.dtype == dtype
    assert layout.itemsize == itemsize
    assert torch.iinfo(dtype).max >= experts - 1


def test_bytes_per_token_for_qwen3_30b_a3b_is_a_quarter_of_int32():
    layout = RoutingLayout(num_layers=48, top_k=8, num_experts=128)
    assert layout.bytes_per_token == 384
    assert layout.bytes_per_token * 4 == 48 * 8 * torch.int32.itemsize
    assert layout.valid_words == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_layers": 0, "top_k": 2, "num_experts": 8}, "num_layers must be positive"),
        ({"num_layers": 2, "top_k": -1, "num_experts": 8}, "top_k must be positive"),
        ({"num_layers": 2, "top_k": 9, "num_experts": 8}, "top_k \\(9\\) exceeds num_experts \\(8\\)"),
        ({"num_layers": 2, "top_k": 2, "num_experts": 40000}, "exceeds 32768"),
        ({"num_layers": 2.0, "top_k": 2, "num_experts": 8}, "num_layers must be an int"),
        ({"num_layers": True, "top_k": 2, "num_experts": 8}, "num_layers must be an int"),
    ],
)
def test_invalid_layouts_are_rejected_with_the_field_named(kwargs, message):
    with pytest.raises(InvalidRoutingInput, match=message):
        RoutingLayout(**kwargs)


def test_layout_from_hf_configs_counts_only_layers_with_a_router():
    from types import SimpleNamespace

    from routing_replay.models import moe_layer_ids

    qwen = SimpleNamespace(model_type="qwen3_moe", num_hidden_layers=6, num_experts=128, num_experts_per_tok=8,
                           mlp_only_layers=[0, 3], decoder_sparse_step=1)
    assert moe_layer_ids(qwen) == [1, 2, 4, 5]
    assert RoutingLayout.from_hf_config(qwen) == RoutingLayout(4, 8, 128)
    sparse_step = SimpleNamespace(model_type="qwen2_moe", num_hidden_layers=6, num_experts=60, num_experts_per_tok=4,
                                  decoder_sparse_step=2)
    assert moe_layer_ids(sparse_step) == [1, 3, 5]
    mixtral = SimpleNamespace(model_type="mixtral", num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2)
    assert RoutingLayout.from_hf_config(mixtral) == RoutingLayout(4, 2, 8)
    glm = SimpleNamespace(model_type="glm4_moe", num_hidden_layers=46, n_routed_experts=128, num_experts_per_tok=8,
                          first_k_dense_replace=1)
    assert RoutingLayout.from_hf_config(glm) == RoutingLayout(45, 8, 128)


def test_layout_refuses_configs_of_unsupported_or_non_moe_models():
    from types import SimpleNamespace

    from routing_replay.models import UnsupportedModel

    with pytest.raises(UnsupportedModel, match="unsupported model type 'llama'; supported: .*qwen3_moe"):
        RoutingLayout.from_hf_config(SimpleNamespace(model_type="llama", num_hidden_layers=2, num_experts_per_tok=1))
    with pytest.raises(UnsupportedModel, match="qwen3_moe config has no num_experts or num_local_experts: not a Mixture-of-Experts"):
        RoutingLayout.from_hf_config(SimpleNamespace(model_type="qwen3_moe", num_hidden_layers=2,
                                                     num_experts_per_tok=1, num_experts=0))
