"""Connecting to Ray: the cluster a ``ray job submit`` runs in, or a local one on loopback; and what
a job submitted to a cluster must not do (``output_dir_problem``)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from routing_replay.config import JobConfig

# Ray reads this when it is first imported: with ``_node_ip_address`` below it keeps a local Ray on
# loopback (Ray otherwise picks the machine's external address). Import this module before ray.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def connect(cfg: JobConfig) -> bool:
    """Joins the Ray cluster of ``RAY_ADDRESS`` (set for ``ray job submit`` drivers) or starts a
    local Ray on 127.0.0.1 sized for this machine. Returns whether this call started Ray (and so
    must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING")
        return False
    ray.init(num_cpus=max(2, os.cpu_count() or 2), num_gpus=cfg.run.gpus or None, object_store_memory=512 << 20,
             include_dashboard=False, _node_ip_address="127.0.0.1", logging_level="WARNING",
             namespace="routing-replay")
    return True


JOB_SUBMISSION_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by Ray's job manager for a ``ray job submit`` entrypoint only (the runtime environment and
metadata as JSON; ray/dashboard/modules/job/job_supervisor.py): not for a driver started by hand,
nor for Ray's workers and actors."""


def job_submission_id(environ: Mapping[str, str] = os.environ) -> str | None:
    """The submission id (``raysubmit_...``) when this process is a ``ray job submit`` entrypoint,
    else None ("" when Ray's variable is set but names no id)."""
    raw = environ.get(JOB_SUBMISSION_ENV)
    if raw is None:
        return None
    try:
        return str(json.loads(raw).get("metadata", {}).get("job_submission_id") or "")
    except (ValueError, AttributeError):
        return ""


def output_dir_problem(output_dir: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """Why ``run.output_dir`` cannot be used here, or None. Under ``ray job submit`` the driver
    starts in the uploaded copy of the working directory (a folder under Ray's session directory on
    one node, which Ray may delete once no job uses it), so a relative run directory would land
    there: refused, with the fix in the message."""
    submission = job_submission_id(environ)
    if submission is None or os.path.isabs(output_dir):
        return None
    name = Path(output_dir).name or "NAME"
    job = f" ({submission})" if submission else ""
    return (f"run.output_dir={output_dir!r} is relative, and this driver runs under `ray job submit`{job}: the run "
            f"would land in Ray's copy of the working directory ({os.getcwd()}), on one node only, which Ray may "
            "delete once no job uses it. Give an absolute path on storage that every node mounts: after "
            f"`routing-replay train` add `--set run.output_dir=/shared/runs/{name}` (or `--output-dir "
            f"/shared/runs/{name}`), or set it in the YAML (docs/cluster.md)")
