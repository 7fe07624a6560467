"""Each Train worker's shard of each epoch's training stream, the same every time the epoch is asked for.

Ray Train splits the datasets it is given once per worker group, and each pass over a split is one more execution
of the same dataset: the only epoch a Ray Data task could see is an execution counter that starts again at 0 in a
new driver or a new worker group. So the training stream is not given to Ray Train. An :class:`EpochShards` actor
builds epoch ``e``'s dataset (:func:`pipeline.stream.train_dataset` with ``epoch=e``: file order, scales and flips
drawn from ``(seed, e)``) when a worker first asks for it, splits it ``streaming_split(world_size, equal=True)``
with Ray Data's order kept, and hands rank ``r`` split ``r``. Ray Data's splitter then gives every rank the same
rows in the same order each time, so a resumed or restarted run trains on the batches an uninterrupted run did.

A rank that asks again for an epoch it was given belongs to a new worker group (the old one failed mid-epoch):
the epoch is split anew for it. Splits of epochs older than the previous one are let go, and with them their
Ray Data executions.
"""

from __future__ import annotations

from typing import Any

import ray
from ray.data import DataContext, DataIterator
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.storage import StorageConfig
from pipeline.stream import Source, StreamConfig, train_dataset


@ray.remote(num_cpus=0)
class EpochShards:
    """Rank ``r``'s :class:`ray.data.DataIterator` over epoch ``e`` of the training stream: ``shard(e, r)``.

    Args:
        source, storage, config: the training stream (:func:`pipeline.stream.train_dataset`).
        world_size: the number of Train workers.
        data_context: the driver's ``DataContext`` (progress bars, resource limits), set in this actor as
            Ray Train sets it in its workers, so the epochs' executions follow the driver's settings.
    """

    def __init__(
        self,
        source: Source,
        storage: StorageConfig,
        config: StreamConfig,
        world_size: int,
        data_context: DataContext | None = None,
    ) -> None:
        if data_context is not None:
            DataContext._set_current(data_context)
        self.source, self.storage, self.config, self.world_size = source, storage, config, world_size
        self.splits: dict[int, tuple[list[DataIterator], set[int]]] = {}  # epoch -> (splits, ranks given)

    def shard(self, epoch: int, rank: int) -> DataIterator:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank}: expected 0..{self.world_size - 1}")
        splits, given = self.splits.get(epoch, (None, set()))
        if splits is None or rank in given:  # first ask, or a new worker group
            dataset = train_dataset(self.source, self.storage, self.config, epoch=epoch)
            splits, given = dataset.streaming_split(self.world_size, equal=True), set()
            self.splits = {e: v for e, v in self.splits.items() if e >= epoch - 1}
            self.splits[epoch] = (splits, given)
        given.add(rank)
        return splits[rank]

    def epochs_held(self) -> list[int]:
        return sorted(self.splits)


def epoch_shards(
    source: Source, storage: StorageConfig, config: StreamConfig, world_size: int
) -> Any:  # an EpochShards actor handle
    """Start an :class:`EpochShards` actor on this node with the caller's ``DataContext``."""
    node = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node, soft=True)
    return EpochShards.options(scheduling_strategy=strategy).remote(
        source, storage, config, world_size, DataContext.get_current()
    )
