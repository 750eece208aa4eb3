"""Where the job's actors run: one Ray placement group for trainer ranks and engines.

Bundles: one per trainer *node group* (the ranks of one expert-parallel group, which exchange
tokens every layer and must share a node's fast links) holding a GPU per rank, and one per engine
holding its ``gpus_per_engine`` GPUs. ``run.placement`` picks the group's strategy: ``colocate``
(PACK: as few nodes as possible, engines next to the trainer: the weight broadcast stays on the
node) or ``separate`` (SPREAD: bundles on different nodes where the cluster has them). On a CPU
cluster the bundles hold a sliver of a CPU instead (Ray needs a resource per bundle), so the same
code runs there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

_CPU_SLIVER = 0.01
"""A bundle's CPU share per actor when the job runs without GPUs (actors themselves ask for none)."""


@dataclass(frozen=True)
class Layout:
    trainer_ranks: int
    ranks_per_node_group: int
    """Trainer ranks that must share a node (the expert-parallel group size)."""
    engines: int
    gpus_per_engine: int
    gpus: bool
    strategy: Literal["colocate", "separate"] = "colocate"

    def bundles(self) -> list[dict[str, float]]:
        if self.trainer_ranks % self.ranks_per_node_group:
            raise ValueError(f"{self.trainer_ranks} trainer ranks do not split into node groups of "
                             f"{self.ranks_per_node_group}")
        groups = self.trainer_ranks // self.ranks_per_node_group
        return ([self._bundle(self.ranks_per_node_group) for _ in range(groups)]
                + [self._bundle(self.gpus_per_engine) for _ in range(self.engines)])

    def trainer_bundle(self, rank: int) -> int:
        """Expert-parallel groups are consecutive ranks (tensor parallelism is 1)."""
        return rank // self.ranks_per_node_group

    def engine_bundle(self, index: int) -> int:
        return self.trainer_ranks // self.ranks_per_node_group + index

    def _bundle(self, actors: int) -> dict[str, float]:
        if self.gpus:
            return {"GPU": float(actors)} if actors else {"CPU": _CPU_SLIVER}
        return {"CPU": _CPU_SLIVER * max(actors, 1)}


class Placement:
    """The reserved placement group and the scheduling option of each actor."""

    def __init__(self, layout: Layout, timeout: float = 300.0) -> None:
        import ray
        from ray.util.placement_group import placement_group

        self.layout = layout
        _check_fits(layout.bundles(), ray.cluster_resources())
        self.group = placement_group(layout.bundles(), strategy="PACK" if layout.strategy == "colocate" else "SPREAD")
        ready, _ = ray.wait([self.group.ready()], timeout=timeout)
        if not ready:
            ray.util.remove_placement_group(self.group)
            raise PlacementError(f"the cluster cannot hold the job's actors within {timeout:.0f} s: bundles "
                                 f"{layout.bundles()} ({ray.available_resources()} available)")

    def trainer(self, rank: int):
        return self._in_bundle(self.layout.trainer_bundle(rank))

    def engine(self, index: int):
        return self._in_bundle(self.layout.engine_bundle(index))

    def _in_bundle(self, bundle: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=bundle,
                                                placement_group_capture_child_tasks=False)

    def release(self) -> None:
        import ray

        ray.util.remove_placement_group(self.group)


def _check_fits(bundles: list[dict[str, float]], cluster: dict[str, float]) -> None:
    """Refuses at once what the whole cluster could never hold (no waiting for a timeout)."""
    for resource in sorted({name for bundle in bundles for name in bundle}):
        needed = sum(bundle.get(resource, 0.0) for bundle in bundles)
        if needed > cluster.get(resource, 0.0):
            raise PlacementError(f"the job needs {needed:g} {resource} in bundles {bundles}; the Ray cluster has "
                                 f"{cluster.get(resource, 0.0):g}")


class PlacementError(RuntimeError):
    """The cluster lacks the resources the job's placement group needs."""
