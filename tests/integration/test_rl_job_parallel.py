"""Two SGLang engines and two trainer ranks (data parallel 2, expert parallel 2, gloo) as Ray actors,
each rank with its own routing collector: SGLang sends each sample's routing to the rank that
trains on it, the ranks exchange tokens with their experts (all-to-all), reduce gradients and stay
identical, and rank 0 broadcasts the weights (experts gathered from both ranks) to both engines."""

from __future__ import annotations

import dataclasses
import math

import pytest

from routing_replay import run_log
from routing_replay.orchestration import driver
from tests.integration.test_rl_job import job_config


@pytest.mark.timeout(600)
def test_data_and_expert_parallel_ranks_train_in_step(ray_local, tmp_path):
    cfg = job_config(tmp_path / "run", steps=2)
    cfg = cfg.model_copy(update={
        "train": dataclasses.replace(cfg.train, parallel=dataclasses.replace(cfg.train.parallel, data=2, expert=2)),
        "rollout": cfg.rollout.model_copy(update={"engines": 2})})
    job = driver.Job(cfg, driver.Options(progress=False))
    try:
        assert len(job.trainers) == 2 and len(set(job.routing_sinks)) == 2
        assert job.engines.rank_offsets() == [1, 2] and job.weight_group.world_size == 3
        job.run()
        probe = job.tokenizer("What is 2 + 2? The answer is 4").input_ids
        per_rank = job._ray.get([t.score.remote(probe) for t in job.trainers])
    finally:
        job.close()
    assert per_rank[0] == per_rank[1]  # dense weights identical after the reduced updates
    records = run_log.read(tmp_path / "run")
    assert [r["step"] for r in records] == [0, 1, 2]
    for record in records[1:]:
        assert all(math.isfinite(v) for v in record.values())
        assert record["routing/coverage"] == 1.0 and record["routing/tokens_differing"] == 0
        assert record["sync/probe_max_abs_diff"] <= 1e-4  # on both engines
