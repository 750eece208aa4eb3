"""Job configurations: every shipped config passes the dry run; bad values name their field."""

import dataclasses
import math
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from routing_replay import config
from routing_replay.megatron.settings import OptimizerSettings, ParallelConfig
from routing_replay.rl.settings import Clip, Correction
from routing_replay.tasks import addition, load_reward
from routing_replay.tasks import math as math_task

CONFIGS = sorted(Path(__file__).parents[2].joinpath("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_passes_the_dry_run(path):
    out = subprocess.run([sys.executable, "-m", "routing_replay.cli", "train", "--config", str(path), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "the configuration is valid" in out.stdout


def test_qwen3_30b_a3b_parameter_count():
    arch = config.architecture_of(config.load(next(p for p in CONFIGS if "r3" in p.name)))
    total, active = config.parameter_count(arch)
    assert 30.0e9 < total < 31.0e9 and 3.2e9 < active < 3.5e9  # Qwen3-30B-A3B: 30.5B, 3.3B active


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("model: {tiny: qwen3_moe}\ntrain: {mini_batchs: 2}\n",
         "train.mini_batchs: unknown key; allowed: parallel, mini_batches, micro_batch_size, optimizer, recompute, "
         "recompute_layers, clip, replay, correction, min_replay_coverage, paired_diagnostics, steps"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {lr: 0.1}}\n",
         "train.optimizer.lr: unknown key; allowed: learning_rate, min_learning_rate, warmup_steps, decay, "
         "total_steps, weight_decay"),
        ("model: {tiny: qwen3_moe}\ntrain: {clip: {low: -0.1, mid: 1}}\n",
         "train.clip.low: Input should be greater than or equal to 0 (line 2); train.clip.mid: unknown key; allowed: "
         "low, high (line 2)"),
        ("model: {tiny: qwen3_moe}\ntrain: {clip: .nan}\n", "train.clip: must be a mapping, got a number"),
        ("model: {tiny: qwen3_moe}\ntrain: {clip: {high: .nan}}\n",
         "train.clip.high: Input should be greater than or equal to 0"),
        ("model: {tiny: qwen3_moe}\ntrain: {correction: {upper: 0.9}}\n",
         "train.correction.upper: Input should be greater than or equal to 1"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {total_steps: 7}}\n",
         "train: Value error, optimizer.total_steps is the job's optimizer steps, train.steps x train.mini_batches: "
         "leave it out"),
        ("model: {tiny: qwen3_moe}\ntrain: {mini_batches: 0}\n", "train.mini_batches: Input should be greater than or equal to 1"),
        ("model: {tiny: qwen3_moe}\ntrain: {replay: R4}\n", "train.replay: Input should be 'none', 'R2' or 'R3'"),
        ("model: {tiny: qwen3_moe, path: /x}\n", "set exactly one of model.path and model.tiny"),
        ("model: [1, 2]\n", "model: must be a mapping, got a list"),
        ("model:\n  architecture: {moe_layers: 0}\n  path: /x\n",
         "model.architecture.moe_layers: Input should be greater than or equal to 1"),
        ("- 1\n", "the top level must be a mapping"),
        ("model: {tiny: {kind: qwen3_moe, experts: 4, top_k: 8}}\n",
         "model.tiny.top_k: Value error, top_k=8 must be at most experts=4"),
        ("model: {tiny: {kind: qwen3_moe, shared_expert: 32}}\n",
         "model.tiny.shared_expert: Value error, only qwen2_moe has a sized shared expert, not qwen3_moe"),
        ("model: {tiny: {kind: qwen2_moe, hidden: 60}}\n", "model.tiny.hidden: Input should be a multiple of 8"),
        ("model: {tiny: {kind: mixtral, layers: 0}}\n",
         "model.tiny.layers: Input should be greater than or equal to 1"),
        ("model: {tiny: {kind: qwen3_moe, dense_layers: [0]}}\n",
         "model.tiny.dense_layers: unknown key; allowed: kind"),
        ("model: {tiny: {layers: 4}}\n", "model.tiny.kind: Field required"),
        ("model: {tiny: llama}\n", "model.tiny.kind: Input should be 'qwen3_moe', 'qwen2_moe', 'mixtral', 'glm4_moe' "
         "or 'deepseek_v3'"),
        ("model: {tiny: 3}\n", "model.tiny: Value error, must be a kind (qwen3_moe, qwen2_moe, mixtral, glm4_moe, deepseek_v3) or a mapping, "
         "got an integer"),
        ("model: {tiny: qwen3_moe}\ntrain: {min_replay_coverage: 1.5}\n",
         "train.min_replay_coverage: Input should be less than or equal to 1"),
        ("model: {tiny: qwen3_moe}\ntrain: {paired_diagnostics: 1}\n",
         "train.paired_diagnostics: Input should be a valid boolean"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {warmup_steps: -1}}\n",
         "train.optimizer.warmup_steps: Input should be greater than or equal to 0"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {decay: step}}\n",
         "train.optimizer.decay: Input should be 'constant', 'linear' or 'cosine'"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {learning_rate: 1.0e-5, min_learning_rate: 2.0e-5}}\n",
         "train.optimizer.min_learning_rate: Value error, min_learning_rate=2e-05 must be at most learning_rate=1e-05"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {min_learning_rate: -1.0}}\n",
         "train.optimizer.min_learning_rate: Input should be greater than or equal to 0"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {weight_decay: -0.1}}\n",
         "train.optimizer.weight_decay: Input should be greater than or equal to 0"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {adam_beta1: 1.0}}\n",
         "train.optimizer.adam_beta1: Input should be less than 1"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {adam_beta2: -0.5}}\n",
         "train.optimizer.adam_beta2: Input should be greater than or equal to 0"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {adam_eps: 0}}\n",
         "train.optimizer.adam_eps: Input should be greater than 0"),
        ("model: {tiny: qwen3_moe}\ntrain: {optimizer: {distributed: 1}}\n",
         "train.optimizer.distributed: Input should be a valid boolean"),
        ("model: {tiny: qwen3_moe}\ntrain: {recompute: partial}\n",
         "train.recompute: Input should be 'none', 'selective' or 'full'"),
        ("model: {tiny: qwen3_moe}\ntrain: {recompute_layers: 0}\n",
         "train.recompute_layers: Input should be greater than or equal to 1"),
        ("model: {tiny: qwen3_moe}\nrollout: {max_prompt_tokens: 0}\n",
         "rollout.max_prompt_tokens: Input should be greater than or equal to 1"),
        ("model: {tiny: qwen3_moe}\nrun: {placement: spread}\n",
         "run.placement: Input should be 'colocate' or 'separate'"),
    ],
)
def test_bad_values_name_the_field(tmp_path, text, message):
    with pytest.raises(config.ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config.load(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("rollout: {top_p: 0.9}", "rollout.top_p must be 1"),
        ("train: {parallel: {tensor: 3}}", "train.parallel.tensor=3 must divide"),
        ("train: {parallel: {expert: 3, data: 4}}", "train.parallel.expert=3 must divide the 8 experts"),
        ("train: {parallel: {sequence_parallel: true}}", "sequence_parallel needs"),
        ("rollout: {prompts_per_step: 3, group_size: 3}\ntrain: {mini_batches: 2}", "9 samples must split"),
        ("task: {reward: 'nowhere.module:fn'}", "task.reward"),
        ("train: {parallel: {tensor: 2}}", "train.parallel.tensor=2: the RL trainer supports data and expert"),
        ("train: {parallel: {expert: 4, data: 2}}", "train.parallel.expert must divide data x tensor x context"),
        ("rollout: {prompts_per_step: 4, group_size: 4}\ntrain: {mini_batches: 2, micro_batch_size: 3}",
         "train.micro_batch_size=3 must divide the 8 samples of a mini-batch per data-parallel rank"),
        ("rollout: {prompts_per_step: 8, group_size: 4}\ntrain: {mini_batches: 2, micro_batch_size: 3, "
         "parallel: {data: 2}}", "train.micro_batch_size=3 must divide the 8 samples"),
        ("train: {recompute: full, recompute_layers: 3}",
         "train.recompute_layers=3 must divide the 2 layers per pipeline stage"),
        ("run: {gpus: 2, gpu_memory_gib: 0.001}", "trainer memory per GPU: about 0.1 GiB (params 0.0 + grads 0.0 + "
         "main_params 0.0 + adam 0.0 + activations 0.1 + logits 0.0 + backward 0.1) exceeds 90% of "
         "run.gpu_memory_gib=0.001"),
    ],
)
def test_cross_field_problems_are_reported(tmp_path, text, problem):
    cfg = config.load(write(tmp_path, "model: {tiny: qwen3_moe}\n" + text + "\n"))
    problems = config.validate_job(cfg, config.architecture_of(cfg))
    assert any(problem in p for p in problems), problems


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4, 8, 9, 64])
def test_a_micro_batch_that_divides_the_mini_batch_share_or_exceeds_it_is_valid(tmp_path, micro_batch_size):
    text = ("rollout: {prompts_per_step: 4, group_size: 4}\n"
            f"train: {{mini_batches: 2, micro_batch_size: {micro_batch_size}}}")
    cfg = config.load(write(tmp_path, "model: {tiny: qwen3_moe}\n" + text + "\n"))
    assert config.validate_job(cfg, config.architecture_of(cfg)) == []


@pytest.mark.parametrize("text", [
    "train: {recompute: selective, recompute_layers: 3}",  # recompute_layers only matters with full
    "train: {recompute: full, recompute_layers: 2}",
    "train: {optimizer: {distributed: true}}",  # one data-parallel rank: nothing to shard, allowed
    "train: {optimizer: {learning_rate: 1.0e-4, min_learning_rate: 1.0e-4, decay: cosine, warmup_steps: 5}}",
])
def test_optimizer_and_recompute_settings_that_are_valid(tmp_path, text):
    cfg = config.load(write(tmp_path, "model: {tiny: qwen3_moe}\n" + text + "\n"))
    assert config.validate_job(cfg, config.architecture_of(cfg)) == []


def test_optimizer_recompute_and_placement_defaults(tmp_path):
    cfg = config.load(write(tmp_path, "model: {tiny: qwen3_moe}\n"))
    t, o = cfg.train, cfg.train.optimizer
    assert (o.learning_rate, o.warmup_steps, o.decay, o.min_learning_rate) == (1e-5, 0, "constant", 0.0)
    assert (o.weight_decay, o.total_steps) == (0.0, 10)  # the schedule spans train.steps x train.mini_batches
    assert (o.adam_beta1, o.adam_beta2, o.adam_eps, o.grad_clip) == (0.9, 0.999, 1e-8, 1.0)
    assert (o.distributed, t.recompute, t.recompute_layers) == (False, "none", 1)
    assert (t.clip, t.correction) == (Clip(low=0.2, high=0.28), Correction("truncate", "token", upper=2.0, lower=0.5))
    assert (cfg.rollout.max_prompt_tokens, cfg.run.placement) == (512, "colocate")


# Hand-computable: attention 4 x 2 x (2 + 2 + 1 + 1) = 48, router 16 per layer; experts 4 x 3 x 4 x 8 = 384
# per layer; embeddings 2 x 16 x 4 = 128. Total 1024: 768 expert and 256 dense parameters.
SMALL = config.Architecture(num_layers=2, hidden_size=4, num_attention_heads=2, num_key_value_heads=1, head_dim=2,
                            num_experts=4, top_k=2, moe_intermediate_size=8, vocab_size=16)


def small_job(train_dtype="bfloat16", **train) -> config.JobConfig:
    return config.JobConfig(
        model=config.ModelSection(path="/x", architecture=SMALL, train_dtype=train_dtype),
        rollout=config.RolloutSection(max_prompt_tokens=3, max_new_tokens=1),
        train=config.TrainSection(parallel=ParallelConfig(data=4, expert=2), micro_batch_size=1, **train))


@pytest.mark.parametrize(
    ("train_dtype", "distributed", "expected"),
    [
        # per GPU: 256 dense + 768 / EP 2 = 384 expert parameters; the distributed optimizer holds
        # 256 / DP 4 + 384 / (expert data parallel 4 / 2) = 256 of them
        ("bfloat16", False, {"params": 640 * 2, "grads": 640 * 4, "main_params": 640 * 4, "adam": 640 * 8}),
        ("bfloat16", True, {"params": 640 * 2, "grads": 640 * 4, "main_params": 256 * 4, "adam": 256 * 8}),
        ("float32", False, {"params": 640 * 4, "grads": 640 * 4, "main_params": 0, "adam": 640 * 8}),
        ("float32", True, {"params": 640 * 4, "grads": 640 * 4, "main_params": 0, "adam": 256 * 8}),
    ],
)
def test_memory_estimate_of_weights_gradients_and_optimizer_state(train_dtype, distributed, expected):
    assert config.parameter_count(SMALL)[0] == 1024
    memory = config.memory_estimate(small_job(train_dtype, optimizer=OptimizerSettings(distributed=distributed)), SMALL)
    assert {part: memory[f"{part}_gib"] * 2**30 for part in expected} == expected
    assert memory["trainer_state_gib"] * 2**30 == sum(expected.values())
    assert memory["trainer_total_gib"] == (memory["trainer_state_gib"] + memory["activations_gib"]
                                           + memory["logits_gib"] + memory["backward_gib"])
    # The softmax backward's three fp32 score-sized tensors of one layer: 3 x 2 heads x 1 x 4^2 x 4 B.
    assert memory["backward_gib"] * 2**30 == 3 * 2 * 1 * 4 * 4 * 4


@pytest.mark.parametrize(
    ("recompute", "activations"),
    [
        # bf16, 1 x 4 tokens: attention 4 x 2 x (3 x 4 + 8 x 4) = 352 and scores 2 x 16 x 6 = 192 per layer, MoE
        # 4 x 2 x (4 + 2 x (2 x 4 + 4 x 8)) = 672; plus one score buffer 2 x 16 x 2 = 64
        ("none", 2 * (352 + 192) + 2 * 672 + 64),
        ("selective", 2 * 352 + 2 * 672 + 192 + 64),
        ("full", 2 * 4 * 2 * 4 + (352 + 672 + 192) + 64),  # the 2 layers' inputs, one layer recomputed
    ],
)
def test_memory_estimate_of_activations_and_logits(recompute, activations):
    memory = config.memory_estimate(small_job(recompute=recompute), SMALL)
    assert memory["activations_gib"] * 2**30 == activations
    assert memory["logits_gib"] * 2**30 == 4 * 16 * (2 + 12)


def test_recompute_shrinks_the_activations():
    cfg = config.load(next(p for p in CONFIGS if p.name == "qwen3-30b-a3b-r3.yaml"))
    arch = config.architecture_of(cfg)
    activations = [config.memory_estimate(cfg.model_copy(update={"train": replace(cfg.train, recompute=recompute)}),
                                          arch)["activations_gib"] for recompute in ("none", "selective", "full")]
    assert activations[0] > activations[1] > activations[2]


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name.startswith("qwen3-30b-a3b")], ids=lambda p: p.name)
def test_qwen3_30b_a3b_configs_fit_80_gib(path):
    cfg = config.load(path)
    arch = config.architecture_of(cfg)
    assert config.validate_job(cfg, arch) == []
    memory = config.memory_estimate(cfg, arch)
    assert cfg.run.gpu_memory_gib == 80 and memory["trainer_total_gib"] <= 0.9 * 80
    assert (cfg.train.optimizer.distributed, cfg.train.recompute, cfg.model.train_dtype) == (True, "full", "bfloat16")


def test_dry_run_prints_the_memory_breakdown(capsys):
    from routing_replay import cli

    path = next(p for p in CONFIGS if p.name == "qwen3-30b-a3b-r3.yaml")
    assert cli.main(["train", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert ("trainer memory per GPU (estimate, GiB): params 9.62, grads 19.24, main_params 7.11, adam 14.22, "
            "activations 5.50, logits 8.11, backward 6.00") in out
    assert "total 69.80 GiB of run.gpu_memory_gib=80 (limit 90%: 72.0); micro-batch of 1 x 4096 tokens" in out


def test_each_trainer_rank_takes_the_train_section_as_it_is(tmp_path):
    import pickle

    from routing_replay.orchestration.driver import trainer_spec
    from routing_replay.orchestration.trainer_settings import TrainerSettings

    cfg = config.load(write(tmp_path, "model: {tiny: qwen3_moe}\nrollout: {temperature: 0.7}\ntrain: {steps: 3, "
                                      "mini_batches: 2, parallel: {data: 2, expert: 2}, clip: {high: .inf}, "
                                      "optimizer: {learning_rate: 1.0e-4, decay: cosine}, correction: {mode: mask}}\n"
                                      "run: {seed: 5}\n"))
    spec = trainer_spec(cfg, rank=1, world_size=2, master_port=1234, model_path="/m", routing_bind="tcp://x:*")
    for field in dataclasses.fields(TrainerSettings):  # the same objects: nothing copied field by field
        assert getattr(spec, field.name) == getattr(cfg.train, field.name), field.name
    assert spec.optimizer.total_steps == 6 and spec.optimizer.decay == "cosine"  # steps x mini-batches
    assert (spec.parallel.data, spec.parallel.expert, spec.clip.high, spec.correction.mode) == (2, 2, math.inf, "mask")
    assert (spec.rank, spec.temperature, spec.train_dtype, spec.seed) == (1, 0.7, "float32", 5)
    assert pickle.loads(pickle.dumps(spec)) == spec  # Ray sends it to the rank


def test_replay_coverage_and_paired_diagnostics_default_to_strict_and_on(tmp_path):
    train = config.load(write(tmp_path, "model: {tiny: qwen3_moe}\n")).train
    assert (train.min_replay_coverage, train.paired_diagnostics) == (1.0, True)
    train = config.load(write(tmp_path, "model: {tiny: qwen3_moe}\ntrain: {min_replay_coverage: 0.9, "
                                        "paired_diagnostics: false}\n")).train
    assert (train.min_replay_coverage, train.paired_diagnostics) == (0.9, False)


def test_a_tiny_shape_gives_the_architecture_of_the_dry_run(tmp_path):
    cfg = config.load(write(tmp_path, "model:\n  tiny: {kind: qwen2_moe, layers: 4, hidden: 32, experts: 16, top_k: 4, "
                                      "moe_intermediate_size: 24, shared_expert: 48, seed: 3}\n"))
    arch = config.architecture_of(cfg)
    assert (arch.num_layers, arch.hidden_size, arch.head_dim, arch.num_experts, arch.top_k,
            arch.moe_intermediate_size) == (4, 32, 8, 16, 4, 24)
    assert config.validate_job(cfg, arch) == []
    problems = config.validate_job(cfg.model_copy(update={"train": replace(
        cfg.train, parallel=ParallelConfig(expert=3, data=3))}), arch)
    assert any("train.parallel.expert=3 must divide the 16 experts" in p for p in problems), problems


def test_dry_run_exits_2_and_prints_the_problem(tmp_path):
    path = write(tmp_path, "model: {tiny: qwen3_moe}\nrollout: {top_k: 20}\n")
    out = subprocess.run([sys.executable, "-m", "routing_replay.cli", "train", "--config", str(path), "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "rollout.top_p must be 1 and rollout.top_k -1" in out.stderr


def test_builtin_rewards():
    record = addition.prompts(1, seed=3)[0]
    a, b = (int(x) for x in record["prompt"].split("is ")[1].split("?")[0].split(" + "))
    assert addition.reward(record, f" {a + b} because") == 1.0
    assert addition.reward(record, f" {a + b + 1}") == 0.0
    assert math_task.reward({"answer": "3/4"}, "so the result is \\boxed{\\frac{3}{4}}") == 1.0  # math_verify
    assert math_task.reward({"answer": "0.75"}, "thus \\boxed{3/4}") == 1.0
    assert math_task.reward({"answer": "1200"}, "the total is 1,200.") == 1.0
    assert load_reward("routing_replay.tasks.addition:reward") is addition.reward
    with pytest.raises(ValueError, match="must look like"):
        load_reward("no_colon")


def test_dataset_keys_without_a_prompts_file_are_refused_by_the_dry_run():
    cfg = config.JobConfig.model_validate({"model": {"tiny": "qwen3_moe"}, "task": {"prompt_key": "question"}})
    problems = config.validate_job(cfg, config.architecture_of(cfg))
    assert any(p.startswith("task.prompt_key, task.answer_key and task.metadata_keys apply to task.prompts")
               for p in problems), problems
