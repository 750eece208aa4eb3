"""Session-scoped real services shared by the integration tests."""

import os

import pytest


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray instance on loopback (2 CPUs, small object store), shut down at the end."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # with _node_ip_address: stay on loopback
    import ray

    ray.init(num_cpus=2, object_store_memory=256 << 20, include_dashboard=False, _node_ip_address="127.0.0.1",
             logging_level="ERROR", namespace="routing-replay-tests")
    yield ray
    ray.shutdown()
