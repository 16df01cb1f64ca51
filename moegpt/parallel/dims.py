"""ParallelDims: the degrees of every kind of parallelism of a run, checked once, and the DeviceMesh.

World layout (outermost first): pp x dp_replicate x dp_shard x ep x tp, so tensor-parallel ranks are
neighbours (one node's NVLink domain on a GPU cluster) and pipeline stages are furthest apart.

- tp: tensor parallel; attention heads and each expert's FFN dimension are split.
- pp: pipeline stages (``virtual_stages`` per rank for interleaved 1F1B).
- ep: expert parallel; the experts of each MoE layer are divided across ``ep`` ranks. EP ranks also
  read different data, so the ranks that hold copies of the dense weights are dp x ep ("batch" ranks)
  and the ranks that hold copies of one expert are dp.
- dp: data parallel: plain (gradients all-reduced), ZeRO-1 (ZeroRedundancyOptimizer; DDP when dp
  is the only degree) or FSDP2
  (``fully_shard``; HSDP with ``dp_replicate`` > 1: replicas of a ``dp / dp_replicate``-way shard).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from moegpt.config import ModelConfig


class DataParallel(str, enum.Enum):
    REPLICATE = "replicate"  # every rank holds the model; gradients all-reduced after the step
    ZERO1 = "zero1"  # ZeroRedundancyOptimizer: optimizer state sharded (with DDP when dp is the only degree)
    FSDP = "fsdp"  # FSDP2: parameters, gradients and optimizer state sharded


class Schedule(str, enum.Enum):
    GPIPE = "gpipe"
    ONE_F_ONE_B = "1f1b"
    INTERLEAVED_1F1B = "interleaved-1f1b"


MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "ep", "tp")


@dataclass(frozen=True, kw_only=True)
class ParallelDims:
    dp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    data_parallel: DataParallel = DataParallel.REPLICATE
    dp_replicate: int = 1  # HSDP: replica groups of FSDP; dp / dp_replicate ranks shard each copy
    schedule: Schedule = Schedule.ONE_F_ONE_B
    virtual_stages: int = 1  # stages per pipeline rank (interleaved 1F1B needs >= 2)
    first_stage_layers: int | None = None  # layers of stage 0 (it also holds the embedding); None: even split

    def __post_init__(self):
        object.__setattr__(self, "data_parallel", DataParallel(self.data_parallel))
        object.__setattr__(self, "schedule", Schedule(self.schedule))
        for name in ("dp", "tp", "pp", "ep", "dp_replicate", "virtual_stages"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive integer")

    @property
    def world_size(self) -> int:
        return self.dp * self.tp * self.pp * self.ep

    @property
    def batch_ranks(self) -> int:
        """Ranks that read different data: dp x ep."""
        return self.dp * self.ep

    @property
    def n_stages(self) -> int:
        return self.pp * self.virtual_stages

    @property
    def dp_shard(self) -> int:
        return self.dp // self.dp_replicate

    def describe(self) -> str:
        parts = [f"{k.upper()}{v}" for k, v in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep), ("dp", self.dp)) if v > 1]
        layout = "x".join(parts) or "1 process"
        extra = [] if self.data_parallel == DataParallel.REPLICATE else [self.data_parallel.value]
        if self.pp > 1:
            extra.append(self.schedule.value)
        return layout + (f" ({', '.join(extra)})" if extra else "")

    def validate(self, world_size: int, cfg: ModelConfig) -> None:
        """Raise one ValueError naming every value when the layout does not fit the world or the model."""
        problems = []
        if self.world_size != world_size:
            problems.append(f"tp({self.tp}) * pp({self.pp}) * ep({self.ep}) * dp({self.dp}) = {self.world_size} "
                            f"!= world_size({world_size})")
        if cfg.n_heads % self.tp:
            problems.append(f"n_heads({cfg.n_heads}) is not divisible by tp({self.tp})")
        if cfg.n_kv_heads % self.tp and cfg.n_kv_heads != 1:
            problems.append(f"n_kv_heads({cfg.n_kv_heads}) is neither 1 (replicated) nor divisible by tp({self.tp})")
        if cfg.d_ff % self.tp:
            problems.append(f"d_ff({cfg.d_ff}) is not divisible by tp({self.tp})")
        if cfg.n_experts % self.ep:
            problems.append(f"n_experts({cfg.n_experts}) is not divisible by ep({self.ep})")
        if self.ep > 1 and cfg.n_moe_layers == 0:
            problems.append(f"ep({self.ep}) needs MoE layers; the model has none")
        if self.dp % self.dp_replicate:
            problems.append(f"dp({self.dp}) is not divisible by dp_replicate({self.dp_replicate})")
        if self.dp_replicate > 1 and self.data_parallel != DataParallel.FSDP:
            problems.append(f"dp_replicate({self.dp_replicate}) is HSDP and needs FSDP")
        if self.schedule == Schedule.INTERLEAVED_1F1B and self.pp > 1 and self.virtual_stages < 2:
            problems.append(f"interleaved-1f1b needs virtual_stages >= 2 (got {self.virtual_stages})")
        if self.schedule != Schedule.INTERLEAVED_1F1B and self.virtual_stages > 1:
            problems.append(f"virtual_stages({self.virtual_stages}) > 1 needs the interleaved-1f1b schedule")
        try:
            stage_layers(cfg.n_layers, self.n_stages, self.first_stage_layers)
        except ValueError as e:
            problems.append(str(e))
        if problems:
            raise ValueError("bad parallel layout: " + "; ".join(problems))

    def build_mesh(self, device_type: str):
        """The DeviceMesh over all ranks, dims ``MESH_DIMS``; call after init_process_group."""
        from torch.distributed.device_mesh import init_device_mesh

        sizes = (self.pp, self.dp_replicate, self.dp_shard, self.ep, self.tp)
        return init_device_mesh(device_type, sizes, mesh_dim_names=MESH_DIMS)


def stage_layers(n_layers: int, n_stages: int, first: int | None = None) -> list[int]:
    """Layers per pipeline stage: ``first`` on stage 0 (None: an even share), the rest spread evenly,
    earlier stages taking the remainder. Every stage holds at least one layer."""
    if n_stages == 1:
        if first is not None and first != n_layers:
            raise ValueError(f"first_stage_layers({first}) != n_layers({n_layers}) with one stage")
        return [n_layers]
    if n_layers < n_stages:
        raise ValueError(f"n_layers({n_layers}) < pipeline stages({n_stages})")
    if first is None:
        base, extra = divmod(n_layers, n_stages)
        return [base + (i < extra) for i in range(n_stages)]
    rest = n_layers - first
    if not 1 <= first or rest < n_stages - 1:
        raise ValueError(f"first_stage_layers({first}) leaves {rest} layers for {n_stages - 1} more stages "
                         f"(n_layers={n_layers})")
    base, extra = divmod(rest, n_stages - 1)
    return [first] + [base + (i < extra) for i in range(n_stages - 1)]
