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


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Tiny random checkpoints (float32) of each model family (``routing_replay.models``), built locally;
    glm4_moe's first layer is dense (a model with fewer routers than layers)."""
    from routing_replay.models import FAMILIES
    from routing_replay.tiny_models import build

    root = tmp_path_factory.mktemp("models")
    shapes = {"glm4_moe": dict(layers=3, dense_layers=[0])}
    return {kind: build(kind, root / kind, seed=i, **shapes.get(kind, {})) for i, kind in enumerate(FAMILIES)}


@pytest.fixture(scope="session")
def routing_collector():
    from routing_replay.wire import RoutingCollector

    with RoutingCollector() as collector:
        yield collector


@pytest.fixture(scope="session")
def qwen3_server(tiny_models, routing_collector, tmp_path_factory):
    """The shared recording server: Qwen3-MoE, float32, small chunked prefill, SGLang's own capture on
    too (for comparison), our default sink the session collector."""
    from tests.integration.sglang_support import start_server

    server = start_server(tiny_models["qwen3_moe"], tmp_path_factory.mktemp("logs") / "qwen3.log",
                          "--record-routing", "--routing-sink", routing_collector.address,
                          "--enable-return-routed-experts", "--chunked-prefill-size", "16")
    yield server
    server.stop()
