"""Job configurations: every shipped config passes the dry run; bad values name their field."""

import subprocess
import sys
from pathlib import Path

import pytest

from routing_replay import config
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
         "train.mini_batchs: unknown key; allowed: parallel, steps, mini_batches"),
        ("model: {tiny: qwen3_moe}\ntrain: {mini_batches: 0}\n", "train.mini_batches: Input should be greater than or equal to 1"),
        ("model: {tiny: qwen3_moe}\ntrain: {replay: R4}\n", "train.replay: Input should be 'none', 'R2' or 'R3'"),
        ("model: {tiny: qwen3_moe, path: /x}\n", "set exactly one of model.path and model.tiny"),
        ("model: [1, 2]\n", "model: must be a mapping, got a list"),
        ("model:\n  architecture: {moe_layers: 0}\n  path: /x\n",
         "model.architecture.moe_layers: Input should be greater than or equal to 1"),
        ("- 1\n", "the top level must be a mapping"),
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
    ],
)
def test_cross_field_problems_are_reported(tmp_path, text, problem):
    cfg = config.load(write(tmp_path, "model: {tiny: qwen3_moe}\n" + text + "\n"))
    problems = config.validate_job(cfg, config.architecture_of(cfg))
    assert any(problem in p for p in problems), problems


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
    assert math_task.reward({"answer": "3/4"}, "so the result is \\boxed{\\frac{3}{4}}") == 0.0  # not normalised LaTeX
    assert math_task.reward({"answer": "0.75"}, "thus \\boxed{3/4}") == 1.0
    assert math_task.reward({"answer": "1200"}, "the total is 1,200.") == 1.0
    assert load_reward("routing_replay.tasks.addition:reward") is addition.reward
    with pytest.raises(ValueError, match="must look like"):
        load_reward("no_colon")
