"""A short RL job on a Parquet dataset of chat messages (``task.chat``), with configured keys and
metadata: the engines get the chat template's rendering, the reward worker gets the metadata."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from routing_replay import config, run_log
from routing_replay.orchestration import driver

pytestmark = pytest.mark.timeout(420)  # the job's start-up: Ray actors, SGLang, megatron-core on 2 cores

SYSTEM = "Answer with a number."
WEIGHTS = [0.0, 0.25, 0.5, 1.0]


def chat_rows() -> list[dict]:
    pairs = [(3, 4), (1, 5), (2, 2), (6, 3)]
    return [{"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"What is {a} + {b}?"}],
             "solution": str(a + b), "weight": w, "source": "chat-test", "tags": ["add", str(i)], "ignored": i}
            for i, ((a, b), w) in enumerate(zip(pairs, WEIGHTS))]


def by_hand(messages: list[dict]) -> str:
    """The tiny tokenizer's ChatML template, written out."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + "<|im_start|>assistant\n"


def test_a_parquet_dataset_of_chat_messages_runs_a_short_job(ray_local, tmp_path):
    data = tmp_path / "dataset" / "data"
    data.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(chat_rows()), data / "train-00000-of-00001.parquet")
    cfg = config.JobConfig.model_validate({
        "model": {"tiny": "qwen3_moe", "rollout_dtype": "float32", "train_dtype": "float32"},
        "rollout": {"prompts_per_step": 4, "group_size": 2, "max_new_tokens": 4, "sync_tolerance": 1e-4,
                    "sglang_args": ["--skip-server-warmup", "--max-total-tokens", "4096"]},
        "train": {"steps": 1, "mini_batches": 1, "micro_batch_size": 8, "optimizer": {"learning_rate": 1e-3},
                  "replay": "R3"},
        "task": {"name": "chat-test", "prompts": str(data), "prompt_key": "messages", "answer_key": "solution",
                 "metadata_keys": ["weight", "source", "tags"], "chat": True,
                 "reward": "tests.integration.chat_rewards:reward", "sft_warmup_steps": 2, "sft_batch_size": 4},
        "run": {"seed": 0, "output_dir": str(tmp_path / "run")},
    })
    job = driver.Job(cfg, driver.Options(progress=False))
    sent = []
    try:
        assert job.prompts[0] == {"prompt": chat_rows()[0]["messages"], "answer": "7",
                                  "metadata": {"weight": 0.0, "source": "chat-test", "tags": ["add", "0"]}}
        generate = job.engines.generate

        def recording(requests):
            sent.extend(requests)
            return generate(requests)

        job.engines.generate = recording
        job.run()
        rendered = {tuple(job.tokenizer(by_hand(row["messages"]), add_special_tokens=False).input_ids)
                    for row in chat_rows()}
    finally:
        job.close()
    # The engines were sent the chat template's rendering of every prompt (all 4 drawn), G times each.
    assert len(sent) == 8 and {r.input_ids for r in sent} == rendered
    assert all(job.tokenizer.decode(r.input_ids).startswith(f"<|im_start|>system\n{SYSTEM}<|im_end|>\n") for r in sent)
    records = run_log.read(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1]  # SFT warm start on the rendered prompts, then one RL step
    assert math.isfinite(records[0]["sft/loss_last"])
    # The reward came from each record's metadata (the worker asserted the rest): the mean weight.
    assert records[1]["reward/mean"] == pytest.approx(sum(WEIGHTS) / len(WEIGHTS))
    assert records[1]["sync/probe_max_abs_diff"] <= 1e-4
