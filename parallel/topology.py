"""Process groups for pipeline x data parallelism, and the `mpu` object DeepSpeed reads them from.

Ranks follow DeepSpeed's pipe-major grid (`PipeDataParallelTopology`): global rank = pipe * dp + data, so the
1F1B baseline (DeepSpeed's own PipelineEngine) and our schedules place ranks identically.

Groups every rank belongs to:
- pipe:    the pp ranks of one data-parallel replica (point-to-point, loss broadcast, grad-norm sum);
- data:    the dp ranks holding the same pipeline rank (ZeRO-1, gradient reduction);
- copies:  for DualPipe, the ranks holding a copy of the same two stages (pipe ranks p and pp-1-p, every dp
           index): router counts are summed here;
- mirror:  for DualPipe, the pair (p, pp-1-p) inside one replica: the two copies' gradients are summed here.
- cp (parallel.cp > 1): the cp adjacent data ranks that split each sequence of one data replica (Ulysses
           attention's all-to-alls); `dp` is then the size of the whole data group, replicas x cp;
- ep, expert_data (parallel.ep > 1): inside each pipeline rank's data group, EP group = ep consecutive data
           ranks (the experts' all-to-all), expert-DP group = the data ranks with the same data % ep (expert
           gradients and their ZeRO-1 partitions). DualPipe's mirror ranks share the data index, hence the
           same ep rank and the same expert shard, so the mirror gradient sum needs nothing extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.distributed as dist


@dataclass
class PipelineTopology:
    pp: int
    dp: int
    rank: int
    dualpipe: bool = False
    ep: int = 1
    cp: int = 1  # context parallelism: `dp` counts the ranks of a stage's data group, cp adjacent ones per replica
    groups: dict[str, object] = field(default_factory=dict)
    group_ranks: dict[str, list[int]] = field(default_factory=dict)

    @property
    def pipe_rank(self) -> int:
        return self.rank // self.dp

    @property
    def dp_rank(self) -> int:
        return self.rank % self.dp

    @property
    def ep_rank(self) -> int:
        return self.dp_rank % self.ep

    @property
    def cp_rank(self) -> int:
        return self.dp_rank % self.cp

    def global_rank(self, pipe: int, data: int) -> int:
        return pipe * self.dp + data

    def pipe_ranks(self, data: int | None = None) -> list[int]:
        d = self.dp_rank if data is None else data
        return [self.global_rank(p, d) for p in range(self.pp)]

    def build_groups(self) -> None:
        """Create every group (all ranks call new_group for all groups, in the same order)."""
        world = self.pp * self.dp
        if world != dist.get_world_size():
            raise ValueError(f"topology pp={self.pp} x dp={self.dp} != world size {dist.get_world_size()}")
        if self.ep < 1 or self.dp % self.ep:
            raise ValueError(f"parallel.ep={self.ep} does not divide the {self.dp} data-parallel ranks of a stage")
        if self.cp < 1 or self.dp % self.cp:
            raise ValueError(f"parallel.cp={self.cp} does not divide the {self.dp} data-parallel ranks of a stage")

        def make(name: str, ranks_list: list[list[int]], own: bool = False) -> None:
            """`own`: a new group even when it spans the world (traffic that must not queue behind the world's)."""
            for ranks in ranks_list:
                group = dist.new_group(ranks) if len(ranks) < world or own else dist.group.WORLD
                if self.rank in ranks:
                    self.groups[name], self.group_ranks[name] = group, ranks

        make("pipe", [[self.global_rank(p, d) for p in range(self.pp)] for d in range(self.dp)])
        make("data", [[self.global_rank(p, d) for d in range(self.dp)] for p in range(self.pp)])
        if self.dualpipe:
            half = range(self.pp // 2)
            make("copies", [sorted(self.global_rank(q, d) for q in (p, self.pp - 1 - p) for d in range(self.dp))
                            for p in half])
            make("mirror", [[self.global_rank(p, d), self.global_rank(self.pp - 1 - p, d)]
                            for d in range(self.dp) for p in half])
            # the same pairs again, a group per stage of the pair (lower: stage p, upper: pp-1-p): each stage's
            # gradient sum starts as soon as its gradients are final, in whichever order the two ranks finish
            for which in ("mirror_lower", "mirror_upper"):
                make(which, [[self.global_rank(p, d), self.global_rank(self.pp - 1 - p, d)]
                             for d in range(self.dp) for p in half], own=True)
            # the mirror sum and the data-parallel reduction as one (parallel/grad_reduce.py): per stage of the
            # pair, the two copies of every data replica; experts over their expert-DP ranks only
            # parameters both stages of a rank write (the tied embedding): summed once both are done with them, in
            # another order on the two ranks of a pair than the stages' own sums, so on a group of their own
            make("mirror_shared", [[self.global_rank(p, d), self.global_rank(self.pp - 1 - p, d)]
                                   for d in range(self.dp) for p in half], own=True)
            make("grads_shared", [sorted(self.global_rank(q, d) for q in (p, self.pp - 1 - p) for d in range(self.dp))
                                  for p in half], own=True)
            for which in ("lower", "upper"):
                self._make_or_alias(make, f"grads_{which}", f"mirror_{which}", [
                    sorted(self.global_rank(q, d) for q in (p, self.pp - 1 - p) for d in range(self.dp))
                    for p in half])
                if self.ep > 1:
                    self._make_or_alias(make, f"expert_grads_{which}", f"mirror_{which}", [
                        sorted(self.global_rank(q, d) for q in (p, self.pp - 1 - p) for d in range(j, self.dp, self.ep))
                        for p in half for j in range(self.ep)])
        else:
            self.groups["copies"], self.group_ranks["copies"] = self.groups["data"], self.group_ranks["data"]
        if self.cp > 1:
            make("cp", [[self.global_rank(p, d) for d in range(k, k + self.cp)]
                        for p in range(self.pp) for k in range(0, self.dp, self.cp)])
        if self.ep > 1:
            make("ep", [[self.global_rank(p, d) for d in range(k, k + self.ep)]
                        for p in range(self.pp) for k in range(0, self.dp, self.ep)])
            # the same ranks for the all-to-alls' small count exchange: a communicator (NCCL: a stream) of its
            # own, so it does not queue behind the row transfers in flight on "ep"
            make("ep_layout", [[self.global_rank(p, d) for d in range(k, k + self.ep)]
                               for p in range(self.pp) for k in range(0, self.dp, self.ep)], own=True)
            make("expert_data", [[self.global_rank(p, d) for d in range(j, self.dp, self.ep)]
                                 for p in range(self.pp) for j in range(self.ep)])


    def reduce_group(self, name: str):
        """Group `name` for a reduction, or None where this rank is its only member (nothing to exchange)."""
        return None if len(self.group_ranks[name]) == 1 else self.groups[name]

    def _make_or_alias(self, make, name: str, same_as: str, ranks_list: list[list[int]]) -> None:
        """A group per ranks list, or the existing group `same_as` where it has exactly this rank's ranks (no
        second group of the same members: each costs connections)."""
        mine = next(r for r in ranks_list if self.rank in r)
        if sorted(self.group_ranks[same_as]) == mine:
            # every rank of the world takes the same branch: all of `same_as`'s lists equal these ones
            self.groups[name], self.group_ranks[name] = self.groups[same_as], self.group_ranks[same_as]
        else:
            make(name, ranks_list, own=True)


class PipelineMpu:
    """What DeepSpeed asks an `mpu` for. The pipeline counts as DeepSpeed's "model parallel" dimension, so its
    grad norm sums over the pipeline ranks."""

    def __init__(self, topo: PipelineTopology) -> None:
        self.topo = topo

    def get_data_parallel_group(self):
        return self.topo.groups["data"]

    def get_data_parallel_world_size(self) -> int:
        return self.topo.dp

    def get_data_parallel_rank(self) -> int:
        return self.topo.dp_rank

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.topo.group_ranks["data"]

    def get_model_parallel_group(self):
        return self.topo.groups["pipe"]

    def get_model_parallel_world_size(self) -> int:
        return self.topo.pp

    def get_model_parallel_rank(self) -> int:
        return self.topo.pipe_rank

    # No tensor parallelism: every rank counts all its own parameters in the global grad norm (DeepSpeed
    # counts parameters not marked model-parallel only on tensor-parallel rank 0).
    def get_tensor_model_parallel_rank(self) -> int:
        return 0

    def get_tensor_model_parallel_world_size(self) -> int:
        return 1
