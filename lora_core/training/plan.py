"""Which samples form each micro-batch, as a pure function of (seed, epoch).

An epoch visits every sample `weight` times (kohya repeats; a fractional part is a chance of
one more visit) in a shuffled order. Walking that order, each sample joins the pending batch of
its shape bucket and a batch leaves when full, so micro-batches never mix shapes and, with one
bucket, batch 4 is exactly two consecutive batches of 2. Partial batches leave at the end of the
epoch. Each visit carries its (epoch, position) so its noise and timestep can be seeded per visit.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from .seeds import generator_for


@dataclass(frozen=True)
class MicroBatch:
    indices: tuple[int, ...]
    visits: tuple[tuple[int, int], ...]  # (epoch, position in the epoch's order) per sample


class BatchPlan:
    def __init__(self, shapes: Sequence[tuple[int, ...]], weights: Sequence[float], batch_size: int, seed: int):
        self.shapes = [tuple(s) for s in shapes]
        self.weights = list(weights)
        self.batch_size = batch_size
        self.seed = seed

    def epoch(self, epoch: int) -> list[MicroBatch]:
        generator = generator_for(self.seed, "order", epoch)
        visits: list[int] = []
        for index, weight in enumerate(self.weights):
            whole, fraction = math.floor(weight), weight - math.floor(weight)
            extra = 1 if fraction > 0 and torch.rand(1, generator=generator).item() < fraction else 0
            visits += [index] * (whole + extra)
        order = torch.randperm(len(visits), generator=generator).tolist()
        pending: dict[tuple[int, ...], list[tuple[int, int]]] = {}
        batches = []
        for position, visit in enumerate(order):
            index = visits[visit]
            bucket = pending.setdefault(self.shapes[index], [])
            bucket.append((index, position))
            if len(bucket) == self.batch_size:
                batches.append(self._batch(epoch, bucket))
                pending[self.shapes[index]] = []
        batches += [self._batch(epoch, bucket) for bucket in pending.values() if bucket]
        return batches

    @staticmethod
    def _batch(epoch: int, members: list[tuple[int, int]]) -> MicroBatch:
        return MicroBatch(tuple(i for i, _ in members), tuple((epoch, p) for _, p in members))

    def micro_batches(self, start: int = 0) -> Iterator[MicroBatch]:
        """Micro-batches from global index `start` on, forever (epochs are regenerated, not stored).

        Epochs left empty by fractional weights are passed over; the data validation makes sure
        some sample has a positive weight.
        """
        epoch = 0
        while start >= len(batches := self.epoch(epoch)):
            start -= len(batches)
            epoch += 1
        yield from batches[start:]
        while True:
            epoch += 1
            yield from self.epoch(epoch)
