"""Reward workers: Ray actors that score responses with the task's reward function."""

from __future__ import annotations

from collections.abc import Sequence


class RewardWorker:
    """A Ray actor body: loads the reward function once, scores batches."""

    def __init__(self, reward_path: str) -> None:
        from routing_replay.tasks import load_reward

        self.reward = load_reward(reward_path)

    def score(self, records: Sequence[dict], responses: Sequence[str]) -> list[float]:
        return [float(self.reward(record, response)) for record, response in zip(records, responses)]


def score_all(workers: list, records: Sequence[dict], responses: Sequence[str]) -> list[float]:
    """Scores on every worker in parallel (contiguous shares), in input order."""
    import ray

    share = -(-len(records) // len(workers))
    futures = [worker.score.remote(records[i : i + share], responses[i : i + share])
               for worker, i in zip(workers, range(0, len(records), share))]
    return [reward for part in ray.get(futures) for reward in part]
