"""Hugging Face checkpoints at scale: sharded safetensors in and out of megatron-core, and the
bucketed weight broadcast into a real SGLang engine.

Ranks read only their part of a two-file checkpoint (checked tensor by tensor against megatron-core's
own cut of the world-1 model, and byte for byte); the export streams to one writer, which writes
shards plus the transformers index; transformers and SGLang load what it wrote and compute exactly
what they compute from the original checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from routing_replay.megatron.hf_checkpoint import (
    INDEX_NAME,
    build_model,
    export_hf,
    hf_tensor_meta,
    iter_hf_buckets,
    load_hf,
    save_hf,
)
from routing_replay.orchestration.weight_sync import TensorMeta
from tests.integration.hf_io_ranks import TP_SHARDED

LAYERS, EXPERTS = 2, 8


@pytest.fixture(scope="module")
def megatron_ready():
    from routing_replay.megatron.parallel import ParallelConfig, initialize

    initialize(ParallelConfig())


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory) -> Path:
    """A single-file tiny Qwen3-MoE checkpoint (float32, vocabulary 415: odd, so TP pads it)."""
    from routing_replay.tiny_models import build

    return build("qwen3_moe", tmp_path_factory.mktemp("hf-io") / "single", layers=LAYERS, experts=EXPERTS, seed=31)


def tensor_bytes(path: Path) -> dict[str, int]:
    from safetensors.torch import load_file

    return {name: t.numel() * t.element_size() for name, t in load_file(path / "model.safetensors").items()}


@pytest.fixture(scope="module")
def two_files(qwen3, megatron_ready, tmp_path_factory) -> Path:
    """The same checkpoint as two shards plus the index, written by ``save_hf`` (world 1), tokenizer added."""
    from transformers import AutoConfig, AutoTokenizer

    total = sum(tensor_bytes(qwen3).values())
    out = save_hf(build_model(qwen3), AutoConfig.from_pretrained(qwen3), tmp_path_factory.mktemp("hf-io") / "two",
                  max_shard_bytes=total * 2 // 3)
    AutoTokenizer.from_pretrained(qwen3).save_pretrained(out)
    assert sorted(p.name for p in out.glob("*.safetensors")) == ["model-00001-of-00002.safetensors",
                                                                 "model-00002-of-00002.safetensors"]
    return out


def weights_of(model) -> dict[str, torch.Tensor]:
    return {name: t for name, t in model.state_dict().items() if not name.endswith("_extra_state")}


def hf_logits(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(tokens).logits


def test_bucket_split_keeps_the_send_order_and_the_bound():
    shapes = [(10,), (300,), (2, 50), (1000,), (5,), (5,), (90,), (1,)]  # float32: 40, 1200, 400, 4000, 20, ...
    meta = TensorMeta(tuple(f"t{i}" for i in range(len(shapes))), ("float32",) * len(shapes), tuple(shapes))
    buckets = meta.buckets(1000)
    assert [b.names for b in buckets] == [("t0",), ("t1",), ("t2",), ("t3",), ("t4", "t5", "t6", "t7")]
    assert sum((b.names for b in buckets), ()) == meta.names
    for bucket in buckets:
        sizes = [4 * torch.Size(s).numel() for s in bucket.shapes]
        assert sum(sizes) <= 1000 or len(sizes) == 1  # only a tensor over the bound goes alone
        assert bucket.dtypes == ("float32",) * len(bucket.names)
    assert [b.names for b in meta.buckets(10**9)] == [meta.names]
    with pytest.raises(ValueError, match="bucket_bytes must be positive"):
        meta.buckets(0)


def test_a_two_file_checkpoint_loads_exports_and_streams_at_world_1(qwen3, two_files, megatron_ready):
    from safetensors.torch import load_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(qwen3)
    sizes = tensor_bytes(qwen3)
    index = json.loads((two_files / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(sizes.values()) and index["weight_map"].keys() == sizes.keys()
    assert not list(two_files.glob("*.partial")) and (two_files / "config.json").exists()

    single, sharded = build_model(qwen3), build_model(two_files)
    assert single.hf_bytes_read == sharded.hf_bytes_read == sum(sizes.values())
    assert all(torch.equal(a, b) for a, b in zip(weights_of(single).values(), weights_of(sharded).values()))
    original = load_file(qwen3 / "model.safetensors")
    assert load_hf(sharded, config, original) == sum(sizes.values())  # the in-memory path reads alike

    exported = export_hf(sharded, config)
    assert exported.keys() == original.keys() and all(torch.equal(exported[n], original[n]) for n in original)
    assert hf_tensor_meta(sharded, config) == [(n, t.dtype, tuple(t.shape)) for n, t in exported.items()]
    bound = sum(sizes.values()) // 5
    streamed = [list(bucket) for bucket in iter_hf_buckets(sharded, config, bound)]
    assert [list(b.names) for b in TensorMeta.of_model(sharded, config).buckets(bound)] == streamed
    assert len(streamed) >= 5


def test_a_broken_sharded_checkpoint_is_refused_naming_the_problem(two_files, megatron_ready, tmp_path):
    from transformers import AutoConfig

    def broken(edit) -> Path:
        copy = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        shutil.copytree(two_files, copy)
        index = json.loads((copy / INDEX_NAME).read_text())
        edit(copy, index["weight_map"])
        (copy / INDEX_NAME).write_text(json.dumps(index))
        return copy

    expert = "model.layers.1.mlp.experts.7.down_proj.weight"
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    with pytest.raises(FileNotFoundError, match="missing: \\['model-00002-of-00002.safetensors'\\]"):
        build_model(broken(lambda d, m: (d / second).unlink()))
    with pytest.raises(KeyError, match=f"checkpoint lacks \\['{expert}'\\]"):
        build_model(broken(lambda d, m: m.pop(expert)))
    with pytest.raises(KeyError, match="not mapped to the Megatron model: \\['model.layers.9.extra.weight'\\]"):
        build_model(broken(lambda d, m: m.update({"model.layers.9.extra.weight": m[expert]})))
    with pytest.raises(KeyError, match=f"{expert}: model-0000.-of-00002.safetensors, where the index places it"):
        build_model(broken(lambda d, m: m.update({expert: first if m[expert] == second else second})))
    from safetensors.torch import load_file

    weights = {**load_file(two_files / first), **load_file(two_files / second)}
    weights["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 60)
    with pytest.raises(ValueError, match="o_proj.weight'\\] give a shard of shape \\(64, 60\\) for a parameter of"):
        load_hf(build_model(two_files, load_weights=False), AutoConfig.from_pretrained(two_files), weights)


@pytest.mark.parametrize(("tensor", "expert", "pipeline", "world"),
                         [(2, 1, 1, 2), (1, 2, 1, 2), (2, 2, 1, 4), (1, 1, 2, 2)], ids=["tp2", "ep2", "tp2-ep2", "pp2"])
def test_parallel_ranks_read_only_their_part_and_one_writer_saves_shards(tensor, expert, pipeline, world, qwen3,
                                                                         two_files, megatron_ready, tmp_path):
    import torch.multiprocessing as mp

    from routing_replay.ports import free_port
    from tests.integration.hf_io_ranks import load_and_save

    reference = tmp_path / "world1.pt"
    torch.save(weights_of(build_model(two_files)), reference)
    sizes = tensor_bytes(qwen3)
    out, max_shard = tmp_path / "export", sum(sizes.values()) // 6
    mp.spawn(load_and_save, args=(world, tensor, expert, pipeline, free_port(), str(two_files), str(reference),
                                  str(out), max_shard), nprocs=world, join=True)

    # Every rank checked its exact share; together: each tensor-parallel slice once per data-parallel
    # replica, replicated tensors once per rank of a stage, experts once per expert-data-parallel replica.
    experts = sum(n for name, n in sizes.items() if ".experts." in name)
    replicated = sum(n for name, n in sizes.items() if not TP_SHARDED.search(name))
    dense_sliced = sum(sizes.values()) - experts - replicated
    data, expert_data = world // (tensor * pipeline), world // (tensor * expert * pipeline)
    reads = [int((tmp_path / f"read-rank{r}").read_text()) for r in range(world)]
    assert sum(reads) == data * tensor * replicated + data * dense_sliced + expert_data * experts
    assert max(reads) < sum(sizes.values())

    index = json.loads((out / INDEX_NAME).read_text())
    files = sorted(p.name for p in out.iterdir())
    shards = sorted(set(index["weight_map"].values()))
    assert files == sorted(["config.json", INDEX_NAME, *shards]) and len(shards) >= 4
    assert index["weight_map"].keys() == sizes.keys() and index["metadata"]["total_size"] == sum(sizes.values())
    for shard in shards:
        in_shard = [sizes[name] for name, file in index["weight_map"].items() if file == shard]
        assert sum(in_shard) <= max_shard or len(in_shard) == 1
    tokens = torch.randint(5, 400, (2, 12), generator=torch.Generator().manual_seed(5))
    assert torch.equal(hf_logits(out, tokens), hf_logits(qwen3, tokens))


ENGINE_ARGS = ("--max-total-tokens", "4096", "--skip-server-warmup", "--mem-fraction-static", "0.5")


@pytest.mark.timeout(420)
def test_sglang_serves_a_sharded_export_and_loads_bucketed_broadcasts(qwen3, two_files, megatron_ready, tmp_path):
    """One engine started on the two-file export: its log-probs equal the trainer's and, after
    reloading the single-file original, are identical. Then the trainer's changed weights arrive
    by broadcast in several buckets, one ``update_weights_from_distributed`` request each."""
    import concurrent.futures

    import torch.distributed as dist
    from transformers import AutoConfig

    from routing_replay.megatron.logprobs import Batch, score
    from routing_replay.orchestration.engines import EngineSpec, RolloutEngine, RolloutRequest
    from routing_replay.orchestration.weight_sync import WeightGroup, broadcast_model, open_group
    from routing_replay.ports import free_port

    config = AutoConfig.from_pretrained(qwen3)
    model = build_model(qwen3)
    probe = list(range(5, 45))

    def trainer_logprobs() -> torch.Tensor:
        with torch.no_grad():
            return score(model, Batch.from_sequences([probe])).logprobs[0]

    engine = RolloutEngine(EngineSpec(0, str(two_files), str(tmp_path), ENGINE_ARGS, record_routing=False))
    try:
        served = torch.tensor(engine.score(probe))
        assert torch.allclose(served, trainer_logprobs(), atol=1e-4)
        engine.update_weights(str(qwen3), "single-file")
        assert torch.equal(torch.tensor(engine.score(probe)), served)

        with torch.no_grad():
            noise = torch.Generator().manual_seed(0)
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=noise))
        meta = TensorMeta.of_model(model, config)
        bucket_bytes = sum(tensor_bytes(qwen3).values()) // 4
        assert len(meta.buckets(bucket_bytes)) >= 4
        group = WeightGroup("127.0.0.1", free_port(), 2, "hf-io-buckets", "gloo")
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            joined = pool.submit(engine.join_weight_group, group, 1)
            pg = open_group(group)
            joined.result(timeout=120)
            try:
                received = pool.submit(engine.receive_weights, meta, group.name, "v1", bucket_bytes)
                broadcast_model(model, config, meta, pg, bucket_bytes)
                received.result(timeout=120)
            finally:
                engine.leave_weight_group(group.name)
                dist.destroy_process_group(pg)
        updated = torch.tensor(engine.score(probe))
        assert torch.allclose(updated, trainer_logprobs(), atol=1e-4)
        assert not torch.allclose(updated, served, atol=1e-2)
        request = RolloutRequest("after-v1", tuple(probe[:8]), {"max_new_tokens": 2, "temperature": 0.0})
        assert engine.generate([request])[0].weight_version == "v1"
        log = (tmp_path / "engine0-start0.log").read_text()  # one request per bucket, the version set once
        assert log.count("POST /update_weights_from_distributed") == len(meta.buckets(bucket_bytes))
        assert log.count("new_version='v1'") == 1
    finally:
        engine.stop()
