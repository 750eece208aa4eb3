"""Connecting to Ray: the cluster a ``ray job submit`` runs in, or a local one on loopback."""

from __future__ import annotations

import os

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
