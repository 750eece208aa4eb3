"""A slow, obviously-correct model of RoutingRecorder used as the tests' reference."""

from __future__ import annotations

import torch


class ReferenceRecorder:
    """Dict of (slot, layer) -> tuple of expert ids; no dtype tricks, no native code."""

    def __init__(self, num_slots: int, num_layers: int, top_k: int) -> None:
        self.num_slots, self.num_layers, self.top_k = num_slots, num_layers, top_k
        self.rows: dict[tuple[int, int], tuple[int, ...]] = {}

    def record(self, layer: int, slots: list[int], ids: list[list[int]], valid_rows: int | None = None) -> None:
        n = len(slots) if valid_rows is None else min(valid_rows, len(slots))
        for slot, row in zip(slots[:n], ids[:n]):
            if all(i == -1 for i in row):
                continue
            self.rows[(slot, layer)] = tuple(row)

    def reset(self, slots: list[int]) -> None:
        for slot in slots:
            for layer in range(self.num_layers):
                self.rows.pop((slot, layer), None)

    def expected(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids as int64 with zeros where missing, valid mask)."""
        ids = torch.zeros((len(slots), self.num_layers, self.top_k), dtype=torch.int64)
        valid = torch.zeros((len(slots), self.num_layers), dtype=torch.bool)
        for i, slot in enumerate(slots):
            for layer in range(self.num_layers):
                row = self.rows.get((slot, layer))
                if row is not None:
                    ids[i, layer] = torch.tensor(row)
                    valid[i, layer] = True
        return ids, valid
