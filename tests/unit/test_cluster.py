"""A job under `ray job submit` refuses a relative run.output_dir (the real submission is in
tests/integration/test_ray_job_submit.py)."""

import json

from routing_replay.orchestration import cluster

SUBMITTED = {cluster.JOB_SUBMISSION_ENV: json.dumps(
    {"runtime_env": {"working_dir": "gcs://_ray_pkg_0123.zip"},
     "metadata": {"job_submission_id": "raysubmit_abc", "job_name": "raysubmit_abc"}})}


def test_a_relative_output_dir_is_refused_under_ray_job_submit_with_the_fix():
    problem = cluster.output_dir_problem("runs/qwen3-30b-a3b-r3", SUBMITTED)
    assert problem is not None
    assert "run.output_dir='runs/qwen3-30b-a3b-r3' is relative" in problem
    assert "ray job submit` (raysubmit_abc)" in problem
    assert "--set run.output_dir=/shared/runs/qwen3-30b-a3b-r3" in problem


def test_an_absolute_output_dir_or_a_local_driver_is_fine():
    assert cluster.output_dir_problem("/shared/runs/a", SUBMITTED) is None
    assert cluster.output_dir_problem("runs/a", {}) is None  # started by hand: the user's own directory
    assert cluster.output_dir_problem("runs/a", {"RAY_ADDRESS": "10.0.0.1:6379"}) is None  # a driver joining by hand


def test_the_submission_id_comes_from_rays_job_config_variable():
    assert cluster.job_submission_id(SUBMITTED) == "raysubmit_abc"
    assert cluster.job_submission_id({}) is None
    assert cluster.job_submission_id({cluster.JOB_SUBMISSION_ENV: "not json"}) == ""
    assert cluster.output_dir_problem("runs/a", {cluster.JOB_SUBMISSION_ENV: "{}"}) is not None
