"""Each Train worker's shard of each epoch's training stream, the same every time the epoch is asked for.

Ray Train splits the datasets it is given once per worker group, and each pass over a split is one more execution
of the same dataset: the only epoch a Ray Data task could see is an execution counter that starts again at 0 in a
new driver or a new worker group. So the training stream is not given to Ray Train. An :class:`EpochShards` actor
builds epoch ``e``'s dataset (:func:`pipeline.stream.train_dataset` with ``epoch=e``: file order, scales and flips
drawn from ``(seed, e)``) when a worker first asks for it, splits it ``streaming_split(world_size, equal=True)``
with Ray Data's order kept, and hands rank ``r`` split ``r``. Ray Data's splitter then gives every rank the same
rows in the same order each time, so a resumed or restarted run trains on the batches an uninterrupted run did.

Each worker group asks with its own id (rank 0 draws it and broadcasts it): a new group (the old one failed) gets
every epoch split anew, and the old group's splits are let go, so no rank of the new group can meet a
half-consumed split of the old one. Within a group, splits of epochs older than the previous one are let go,
and with them their Ray Data executions. The actor holds nothing that cannot be rebuilt, so Ray restarts it if
it dies.
"""

from __future__ import annotations

import uuid
from typing import Any

import ray
import torch.distributed as dist
from ray.data import DataContext, DataIterator
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipeline.storage import StorageConfig
from pipeline.stream import Source, StreamConfig, train_dataset


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)
class EpochShards:
    """Rank ``r``'s :class:`ray.data.DataIterator` over epoch ``e`` of the training stream for worker group ``g``:
    ``shard(e, r, g)``.

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
        self.group: str | None = None
        self.splits: dict[int, list[DataIterator]] = {}  # epoch -> one split per rank, of worker group `group`

    def shard(self, epoch: int, rank: int, group: str) -> DataIterator:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank}: expected 0..{self.world_size - 1}")
        if group != self.group:  # a new worker group: nothing of the old one's is handed out again
            self.group, self.splits = group, {}
        if epoch not in self.splits:
            dataset = train_dataset(self.source, self.storage, self.config, epoch=epoch)
            self.splits = {e: v for e, v in self.splits.items() if e >= epoch - 1}
            self.splits[epoch] = dataset.streaming_split(self.world_size, equal=True)
        return self.splits[epoch][rank]

    def epochs_held(self) -> list[int]:
        return sorted(self.splits)


def worker_group_id() -> str:
    """An id shared by the ranks of this worker group (rank 0's, broadcast; a collective)."""
    ids = [uuid.uuid4().hex]
    if dist.is_available() and dist.is_initialized():
        dist.broadcast_object_list(ids, src=0)
    return ids[0]


def epoch_shards(
    source: Source, storage: StorageConfig, config: StreamConfig, world_size: int
) -> Any:  # an EpochShards actor handle
    """Start an :class:`EpochShards` actor on this node with the caller's ``DataContext``."""
    node = ray.get_runtime_context().get_node_id()
    strategy = NodeAffinitySchedulingStrategy(node, soft=True)
    return EpochShards.options(scheduling_strategy=strategy).remote(
        source, storage, config, world_size, DataContext.get_current()
    )
