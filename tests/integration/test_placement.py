"""The job's placement group on a real (local, CPU) Ray: bundles per expert-parallel group and per
engine, actors scheduled into them, released on close."""

from __future__ import annotations

import pytest

from routing_replay.orchestration.placement import Layout, Placement


def test_bundles_hold_an_expert_group_per_node_and_each_engine_its_gpus():
    layout = Layout(trainer_ranks=16, ranks_per_node_group=8, engines=4, gpus_per_engine=2, gpus=True)
    assert layout.bundles() == [{"GPU": 8.0}] * 2 + [{"GPU": 2.0}] * 4
    assert [layout.trainer_bundle(r) for r in (0, 7, 8, 15)] == [0, 0, 1, 1]
    assert [layout.engine_bundle(i) for i in range(4)] == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="12 trainer ranks do not split into node groups of 8"):
        Layout(12, 8, 1, 1, gpus=True).bundles()


class _Where:
    def placement_group(self) -> str:
        import ray

        return ray.get_runtime_context().get_placement_group_id()


def test_actors_run_in_their_bundles_and_the_group_is_released(ray_local):
    ray = ray_local
    placement = Placement(Layout(trainer_ranks=2, ranks_per_node_group=2, engines=1, gpus_per_engine=0, gpus=False))
    try:
        actor = ray.remote(num_cpus=0)(_Where)
        trainers = [actor.options(scheduling_strategy=placement.trainer(r)).remote() for r in range(2)]
        engine = actor.options(scheduling_strategy=placement.engine(0)).remote()
        groups = ray.get([a.placement_group.remote() for a in (*trainers, engine)], timeout=60)
        assert groups == [placement.group.id.hex()] * 3
    finally:
        placement.release()
    assert ray.util.placement_group_table(placement.group)["state"] == "REMOVED"


def test_a_cluster_too_small_is_an_error_naming_the_bundles(ray_local):
    from routing_replay.orchestration.placement import PlacementError

    with pytest.raises(PlacementError, match=r"needs 2 GPU in bundles \[\{'GPU': 2.0\}\]; the Ray cluster has 0"):
        Placement(Layout(trainer_ranks=2, ranks_per_node_group=2, engines=0, gpus_per_engine=0, gpus=True))
