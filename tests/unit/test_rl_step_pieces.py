"""The step's pure pieces: response alignment, splits, a mini-batch's loss and metrics, checkpoints,
prompt sources."""

import json
import math

import pytest
import torch

from routing_replay.orchestration.checkpoints import Checkpoints, RunState
from routing_replay.rl import corrections, objective
from routing_replay.rl.minibatch import loss_and_metrics
from routing_replay.rl.metrics import mini_batch_metrics
from routing_replay.rl.rollout_batch import Sample, response_tensors, split
from routing_replay.tasks import load_prompts


def test_response_tokens_sit_at_the_positions_that_score_them():
    a = Sample("a", (5, 6, 7), (8, 9), (-0.5, -1.5))
    b = Sample("b", (5,), (8, 9, 10), (-1.0, -2.0, -3.0))
    mask, mu = response_tensors([a, b], width=4)
    # position t scores token t + 1: a's response (tokens 3, 4) at positions 2, 3; b's at 0, 1, 2
    assert mask.tolist() == [[False, False, True, True], [True, True, True, False]]
    assert mu.tolist() == [[0, 0, -0.5, -1.5], [-1.0, -2.0, -3.0, 0]]
    assert a.token_ids == [5, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="exceed the batch's 3"):
        response_tensors([a], width=3)
    with pytest.raises(ValueError, match="1 rollout log-probs for 2 response tokens"):
        Sample("c", (1,), (2, 3), (-1.0,))


def test_split_into_equal_contiguous_parts():
    assert split(6, 3) == [range(0, 2), range(2, 4), range(4, 6)]
    with pytest.raises(ValueError, match="7 samples do not split into 2"):
        split(7, 2)


def test_mini_batch_loss_and_metrics_by_hand():
    mask = torch.tensor([[True, True, False]])
    old = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    rollout = torch.log(torch.tensor([[0.25, 0.2, 0.1]]))  # rho = 2, 1 (and a padded 9)
    theta = torch.log(torch.tensor([[0.6, 0.2, 0.9]])).requires_grad_()  # staleness 1.2, 1
    loss, mini = loss_and_metrics(theta, old, rollout, torch.tensor([1.0]), mask, objective.Clip(0.1, 0.1),
                                  corrections.Correction("truncate", "token", upper=1.5))
    stats = mini_batch_metrics(0, mini)
    # token 0: w = min(2, 1.5) = 1.5, s = 1.2 clipped to 1.1 (A > 0) -> 1.65; token 1: w = 1, s = 1 -> 1
    assert float(loss.detach()) == pytest.approx(-(1.5 * 1.1 + 1.0) / 2)
    assert stats["clip_fraction/mb0"] == pytest.approx(0.5)
    assert stats["correction/mb0/weight_mean"] == pytest.approx(1.25)
    assert stats["correction/mb0/changed"] == pytest.approx(0.5)  # token 0 was truncated
    assert stats["mismatch/mb0/mean_abs"] == pytest.approx(math.log(2) / 2)
    assert stats["staleness/mb0/mean_abs"] == pytest.approx(math.log(1.2) / 2, rel=1e-5)
    assert stats["mismatch/mb0/beyond_2"] == 0.0  # |log 2| is not beyond log 2
    assert stats["staleness/mb0/outside_clip"] == pytest.approx(0.5)  # 1.2 is outside [0.9, 1.1]
    loss.backward()
    assert theta.grad[0, 0] == 0 and theta.grad[0, 1] != 0  # the clipped token passes no gradient


def test_checkpoints_commit_atomically_and_keep_the_newest(tmp_path):
    store = Checkpoints(tmp_path, keep=2)
    assert store.latest() is None
    for step in (1, 2, 3):
        staged = store.staging(step)
        (staged / "trainer-rank0.pt").write_bytes(b"x")
        assert store.latest() is None or store.latest()[1].step == step - 1  # not visible before commit
        store.commit(staged, RunState(step, seed=0, config_digest="abc", prompts_drawn=8 * step))
    path, state = store.latest()
    assert state == RunState(3, 0, "abc", 24) and path.name == "step-000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == ["step-000002", "step-000003"]
    store.staging(4)  # a crash while writing step 4 leaves step 3 the latest
    assert store.latest()[1].step == 3


def test_prompts_from_jsonl_and_built_in(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "1 + 1 =", "answer": "2"}) + "\n\n"
                    + json.dumps({"prompt": "x", "answer": "y"}) + "\n")
    assert [r["prompt"] for r in load_prompts("mine", str(path), seed=0)] == ["1 + 1 =", "x"]
    path.write_text('{"prompt": 3}\n')
    with pytest.raises(ValueError, match="p.jsonl:1: a record needs a string 'prompt'"):
        load_prompts("mine", str(path), seed=0)
    single = load_prompts("addition", None, seed=1, count=50, args={"max_operand": 9})
    assert len(single) == 50 and all(int(r["answer"]) <= 18 for r in single)
    with pytest.raises(ValueError, match="task 'mine' has no built-in prompts"):
        load_prompts("mine", None, seed=0)


def test_engine_tensor_parallel_size_from_sglang_arguments():
    from routing_replay.orchestration.driver import _tp_size

    assert _tp_size([]) == 1
    assert _tp_size(["--tp-size", "2", "--mem-fraction-static", "0.7"]) == 2
    assert _tp_size(["--tp=4"]) == 4


def test_job_refuses_a_configuration_that_cannot_run_before_starting_anything(tmp_path):
    from routing_replay import config
    from routing_replay.orchestration import driver

    cfg = config.JobConfig.model_validate({"model": {"tiny": "qwen3_moe"}, "rollout": {"top_p": 0.9},
                                           "run": {"output_dir": str(tmp_path / "run")}})
    with pytest.raises(driver.JobError, match="rollout.top_p must be 1"):
        driver.Job(cfg)
    assert not (tmp_path / "run").exists()
