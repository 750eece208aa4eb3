"""The wire between Ray actors: the collector lives in the trainer actor, the sender in the rollout actor."""


def test_routing_flows_between_ray_actors_without_the_object_store(ray_local):
    ray = ray_local
    assert all(node["NodeManagerAddress"] == "127.0.0.1" for node in ray.nodes())

    @ray.remote(num_cpus=0)
    class Trainer:
        def __init__(self):
            from routing_replay.wire import RoutingCollector

            self.collector = RoutingCollector()

        def address(self) -> str:
            return self.collector.address

        def receive(self, keys: list[str]) -> dict[str, list[int]]:
            got = self.collector.take(keys, timeout=30)
            return {k: [int(s.routing.sum()), s.routing.data_ptr() == __import__("numpy").frombuffer(
                s.source, dtype="uint8").ctypes.data] for k, s in got.items()}

    @ray.remote(num_cpus=0)
    class Rollout:
        def send(self, address: str, n: int) -> dict[str, int]:
            import torch

            from routing_replay.wire import RoutingRecord, RoutingSender, token_hash

            sums = {}
            with RoutingSender() as sender:
                for i in range(n):
                    routing = torch.randint(0, 64, (50 + i, 4, 2), dtype=torch.uint8)
                    record = RoutingRecord.of(f"s{i}", routing, None, num_experts=64, num_tokens=51 + i,
                                              token_hash=token_hash(range(51 + i)))
                    sender.send(record, routing, address)
                    sums[f"s{i}"] = int(routing.sum())
                sender.flush(timeout=30)
            return sums

    trainer, rollout = Trainer.remote(), Rollout.remote()
    address = ray.get(trainer.address.remote())
    assert address.startswith("tcp://127.0.0.1:")
    received = trainer.receive.remote([f"s{i}" for i in range(4)])
    sent = ray.get(rollout.send.remote(address, 4))
    got = ray.get(received)
    assert {k: v[0] for k, v in got.items()} == sent
    assert all(zero_copy for _, zero_copy in got.values())
