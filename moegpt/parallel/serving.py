"""A plain model cut for serving over tensor x pipeline x expert parallel ranks, from outside.

What each rank holds (gpt-fast's and Megatron's cut, the article's TP8 x PP16 serving layout):

- tp: each layer's query heads and each expert's FFN dimension split; with MQA the one KV head is
  computed and cached on every TP rank. A rank's attention output and its FFN output are partial
  sums, summed across the TP group (two all-reduces per layer).
- pp: the decoder layers split in stages (the first may hold fewer, ``first_stage_layers``); the
  embedding on the first stage, the final norm and the head on the last.
- ep: each MoE layer's experts divided across EP ranks. Every EP rank computes attention and routing
  for all the step's tokens; each dispatches its own share of the rows to the experts' owners with
  all-to-all (parallel/expert.py, as training does), and the results are gathered back (on one CPU
  machine: each runs its own experts' rows and the results are summed in shared memory).

World layout, outermost first: pp x ep x tp (TP ranks are neighbours: one node's fast links).

A shard of a model is itself a model: ``local_config`` is the configuration of the layers a rank
holds (H/tp heads, F/tp FFN, its stage's layers). A rank reads only its parts of each tensor
(``shard_slices``, read by checkpoint/partial.py), and ``shard_model`` drops what it does not hold
and puts the collectives on the model as forward hooks, so the model's own forward (prefill)
computes what one process does. The decode program takes the same collectives as an argument
(``ShardCollectives``).

Legend: A rows grouped by expert, D d_model, E experts, El = E/ep local experts, R ep ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moegpt.config import ModelConfig
from moegpt.parallel.dims import ParallelDims, stage_layers
from moegpt.parallel.expert import combine, dispatch
from moegpt.quant.scheme import ACTIVATION_BLOCK, QuantScheme, int8_activations

SERVE_MESH_DIMS = ("pp", "ep", "tp")


@dataclass(frozen=True, kw_only=True)
class ServeRank:
    """Where one rank sits in a serving layout."""

    dims: ParallelDims
    rank: int
    pp: int  # its pipeline stage
    ep: int  # its expert-parallel rank
    tp: int  # its tensor-parallel rank
    first_layer: int  # its stage's decoder layers: [first_layer, last_layer)
    last_layer: int

    @property
    def is_first_stage(self) -> bool:
        return self.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp == self.dims.pp - 1

    def rank_at(self, pp: int, ep: int | None = None, tp: int | None = None) -> int:
        """The global rank at pipeline stage ``pp`` (and this rank's ep / tp unless given)."""
        ep = self.ep if ep is None else ep
        tp = self.tp if tp is None else tp
        return (pp * self.dims.ep + ep) * self.dims.tp + tp


def serve_layout(tp: int = 1, pp: int = 1, ep: int = 1, first_stage_layers: int | None = None) -> ParallelDims:
    return ParallelDims(tp=tp, pp=pp, ep=ep, first_stage_layers=first_stage_layers)


def serve_rank(dims: ParallelDims, rank: int, n_layers: int) -> ServeRank:
    if dims.dp != 1 or dims.virtual_stages != 1:
        raise ValueError(f"serving layouts are tp x pp x ep (got dp={dims.dp}, virtual_stages={dims.virtual_stages})")
    if not 0 <= rank < dims.world_size:
        raise ValueError(f"rank {rank} is outside the layout's {dims.world_size} ranks")
    tp, rest = rank % dims.tp, rank // dims.tp
    ep, pp = rest % dims.ep, rest // dims.ep
    sizes = stage_layers(n_layers, dims.pp, dims.first_stage_layers)
    first = sum(sizes[:pp])
    return ServeRank(dims=dims, rank=rank, pp=pp, ep=ep, tp=tp, first_layer=first, last_layer=first + sizes[pp])


def local_config(cfg: ModelConfig, r: ServeRank) -> ModelConfig:
    """The configuration of what rank ``r`` holds: H/tp query heads (the KV heads split too, or the
    one MQA head kept), F/tp FFN, its stage's layers. The router still picks among all E experts."""
    tp = r.dims.tp
    return cfg.replace(n_heads=cfg.n_heads // tp, head_dim=cfg.head_dim, d_ff=cfg.d_ff // tp,
                       n_kv_heads=cfg.n_kv_heads if cfg.n_kv_heads == 1 else cfg.n_kv_heads // tp,
                       n_layers=r.last_layer - r.first_layer)


def kv_heads_split(cfg: ModelConfig, tp: int) -> bool:
    """Whether the KV heads are split over TP (else replicated: MQA's one head on every rank)."""
    return cfg.n_kv_heads > 1 and cfg.n_kv_heads % tp == 0


def shard_slices(name: str, cfg: ModelConfig, r: ServeRank) -> tuple[slice, ...] | None:
    """The part of the full model's parameter ``name`` rank ``r`` holds, as slices of its dims (a
    model directory can read just that); None where it holds none of it. Names are the model's,
    with the full model's layer indices."""
    dims = r.dims
    if name.startswith("layers."):
        layer = int(name.split(".")[1])
        if not r.first_layer <= layer < r.last_layer:
            return None
    elif name == "embed.weight":
        if not (r.is_first_stage or (r.is_last_stage and cfg.tie_embeddings)):
            return None
    elif name == "lm_head.weight" and not r.is_last_stage:
        return None  # (the final norm is a vector every stage keeps)
    whole = slice(None)

    def part(size: int, n: int, i: int) -> slice:
        return slice(size // n * i, size // n * (i + 1))

    tp, t = dims.tp, r.tp
    if name.endswith("attn.wq.weight"):
        return part(cfg.n_heads * cfg.head_dim, tp, t), whole
    if name.endswith(("attn.wk.weight", "attn.wv.weight")):
        return (part(cfg.n_kv_heads * cfg.head_dim, tp, t) if kv_heads_split(cfg, tp) else whole), whole
    if name.endswith("attn.wo.weight"):
        return whole, part(cfg.n_heads * cfg.head_dim, tp, t)
    if ".ffn." in name and name.endswith(("w_up", "w_gate", "w_down")):
        experts = part(cfg.n_experts, dims.ep, r.ep) if ".experts." in name else whole
        ff = part(cfg.d_ff, tp, t)
        return (experts, ff, whole) if not name.endswith("w_down") else (experts, whole, ff)
    return (whole,)


def check_quantized_split(cfg: ModelConfig, scheme: QuantScheme, tp: int) -> None:
    """A quantized model splits over ``tp`` ranks only where each rank's share of a row-parallel
    weight's inputs (wo's H * Dh, w_down's F) is whole packed words, whole scale groups and, where one
    process quantizes the activations in blocks of ACTIVATION_BLOCK inputs, whole blocks: so each
    rank computes its part of the product as one process does. One-line error naming the values."""
    if tp == 1:
        return
    if scheme.float8:
        raise ValueError(f"--tp {tp}: fp8 weights scale each row's activations as a whole, which a rank holding "
                         "part of the row cannot: serve fp8 with --pp or --ep")
    group = scheme.group_size or 1
    for what, inputs in (("wo", cfg.n_heads * cfg.head_dim), ("w_down", cfg.d_ff)):
        share = inputs // tp
        blocks = ACTIVATION_BLOCK if int8_activations(inputs) else 1
        step = math.lcm(32 // scheme.bits, group, blocks)
        if share % step:
            raise ValueError(f"--tp {tp} gives each rank {share} of {what}'s {inputs} inputs, which {scheme.name} "
                             f"weights split only in multiples of {step}: use fewer TP ranks, or --pp / --ep")


class SharedMemorySum:
    """The sum over a process group whose ranks share one machine, through a shared-memory segment
    (moegpt.kernels' ``shm_sum``): a copy and a wait instead of gloo's TCP round trip (~1.3 ms for 4 KB
    between two processes here). Tensors larger than a slot go through the group's all-reduce."""

    def __init__(self, group, slot_bytes: int = 8 * 2**20, timeout_s: float = 120.0):
        import mmap
        import os
        import tempfile

        self.group, self.timeout_s, self.seq = group, timeout_s, 0
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.slot_bytes = slot_bytes + 128  # + the two flags
        path = [None]
        if self.rank == 0:
            where = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
            fd, path[0] = tempfile.mkstemp(prefix="moegpt-sum-", dir=where)
            os.ftruncate(fd, self.slot_bytes * self.world)
            os.close(fd)
        dist.broadcast_object_list(path, group_src=0, group=group)
        with open(path[0], "r+b") as f:
            self._map = mmap.mmap(f.fileno(), self.slot_bytes * self.world)
        dist.barrier(group=group)  # every rank has it mapped: the name can go
        if self.rank == 0:
            os.unlink(path[0])
        self.segment = torch.frombuffer(self._map, dtype=torch.uint8)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() * x.element_size() > self.slot_bytes - 128:
            x = x.contiguous()
            dist.all_reduce(x, group=self.group)
            return x
        self.seq += 1
        return torch.ops.moegpt.shm_sum(x.contiguous(), self.segment, self.rank, self.world, self.seq, self.timeout_s)

    @staticmethod
    def applies(group, device_type: str) -> bool:
        """Every rank of ``group`` on this machine, on CPUs, with the C++ kernels (call on every rank)."""
        import socket

        from moegpt.kernels import available

        hosts = [None] * dist.get_world_size(group)
        dist.all_gather_object(hosts, (socket.gethostname(), device_type == "cpu" and available()), group=group)
        return len({h for h, _ in hosts}) == 1 and all(ok for _, ok in hosts)


class ShardCollectives:
    """A rank's collectives at a layer's seams (the decode program's ``Collectives``; the model's
    forward gets the same through hooks): TP partial outputs summed, EP rows sent to their experts.

    Every EP rank holds all of a step's rows. Across machines each sends its share to the experts'
    owners with all-to-all and the results are gathered back (``to_owners`` / ``from_owners``, as
    training dispatches); EP ranks on one CPU machine instead take their own experts' rows where
    they lie and sum the results through shared memory (each row is one rank's, the others add
    zeros), which costs a copy instead of four gloo round trips per layer."""

    def __init__(self, tp_group=None, ep_group=None, pipe_group=None, tp_sum=None, ep_sum=None):
        self.tp_group, self.ep_group = tp_group, ep_group
        self.pipe_group = pipe_group  # every rank, for the pipeline's sends alone (its tags its own)
        self.tp_sum = tp_sum  # a SharedMemorySum over tp_group when its ranks share a machine
        self.ep_sum = ep_sum  # ... over ep_group

    @property
    def splits_experts(self) -> bool:
        return self.ep_group is not None

    @property
    def sums_experts(self) -> bool:
        return self.ep_sum is not None

    def first_expert(self, n_experts: int) -> int:
        return dist.get_rank(self.ep_group) * (n_experts // dist.get_world_size(self.ep_group))

    def sum_expert_partials(self, y: torch.Tensor) -> torch.Tensor:
        """This rank's experts' share of an MoE layer's output, its own TP part -> the whole (B, D)."""
        return self.ep_sum(self.sum_partials(y))

    def sum_partials(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return x
        if self.tp_sum is not None and x.device.type == "cpu":
            return self.tp_sum(x)
        x = x.contiguous()
        dist.all_reduce(x, group=self.tp_group)
        return x

    def experts(self, rows: torch.Tensor, expert: torch.Tensor, ends: torch.Tensor, ffn) -> torch.Tensor:
        """rows (A, D) grouped by expert, ``expert`` (A,) each row's, ``ends`` (E,) where each group
        ends -> (A, D): ``ffn(rows, local expert, local ends)`` on the rows' owners."""
        if self.ep_group is None:
            return ffn(rows, expert, ends)
        local, local_counts, plan = self.to_owners(rows, ends)  # (A_recv, D) grouped by local expert
        if local.shape[0] == 0:  # none of this rank's experts was chosen
            return self.from_owners(local, plan, rows.shape[0])
        local_ends = torch.cumsum(local_counts, 0).to(torch.int32)
        local_expert = torch.repeat_interleave(torch.arange(local_counts.numel(), device=rows.device), local_counts)
        return self.from_owners(ffn(local, local_expert, local_ends), plan, rows.shape[0])

    def to_owners(self, rows: torch.Tensor, ends: torch.Tensor):
        """All the step's rows (A, D) grouped by expert (``ends`` (E,)) -> the rows of this rank's
        experts grouped by local expert (A_recv, D), their counts (El,), and the plan back."""
        group = self.ep_group
        R, r, A = dist.get_world_size(group), dist.get_rank(group), rows.shape[0]
        ends = ends.long()
        starts = ends - torch.diff(ends, prepend=ends.new_zeros(1))
        if self.ep_sum is not None:
            El = ends.numel() // R
            mine = slice(r * El, (r + 1) * El)
            lo, hi = int(starts[mine][0]), int(ends[mine][-1])
            return rows[lo:hi], ends[mine] - starts[mine], (lo, hi)
        lo, hi = A * r // R, A * (r + 1) // R  # this rank's share goes to the owners
        return dispatch(rows[lo:hi], ends.clamp(lo, hi) - starts.clamp(lo, hi), group)

    def from_owners(self, y: torch.Tensor, plan, A: int) -> torch.Tensor:
        """The experts' results (A_recv, D) -> all A rows (A, D) on every rank, in order."""
        group = self.ep_group
        if self.ep_sum is not None:
            lo, hi = plan
            out = y.new_zeros(A, *y.shape[1:])
            out[lo:hi] = y
            return self.ep_sum(out)
        y = combine(y, plan, group)  # (A_r, D): this rank's share
        R = dist.get_world_size(group)
        sizes = [A * (r + 1) // R - A * r // R for r in range(R)]
        padded = y.new_zeros(max(sizes), *y.shape[1:])
        padded[:y.shape[0]] = y
        parts = [torch.empty_like(padded) for _ in range(R)]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _ExpertParallelHooks:
    """Around an MoE layer's ``Experts`` (El local experts) in the model's forward: the rows of
    every expert come in and go to their owners before the module runs, and come back after it."""

    def __init__(self, collectives: ShardCollectives):
        self.collectives, self.plan, self.n_rows = collectives, None, 0

    def before(self, module, args):
        rows, counts = args  # (A, D) grouped by global expert, (E,)
        self.n_rows = rows.shape[0]
        local, local_counts, self.plan = self.collectives.to_owners(rows, torch.cumsum(counts, 0))
        return local, local_counts

    def after(self, module, args, y):
        y, self.plan = self.collectives.from_owners(y, self.plan, self.n_rows), None
        return y


def _sum_output(collectives: ShardCollectives):
    def hook(module, args, out):  # attention: y; an FFN: (y, router stats)
        if isinstance(out, tuple):
            return collectives.sum_partials(out[0]), *out[1:]
        return collectives.sum_partials(out)
    return hook


@torch.no_grad()
def shard_model(model: nn.Module, r: ServeRank, collectives: ShardCollectives) -> nn.Module:
    """A model whose parameters are rank ``r``'s parts (``shard_slices``; checkpoint/partial.py
    reads just those from a directory), made rank ``r``'s shard in place: other stages' layers
    dropped (and the embedding and head where the stage holds none), ``model.cfg`` the local
    configuration, and the collectives hooked on (TP sums after attention and the FFN, EP dispatch
    around the experts). Returns the model."""
    from moegpt.model.attention import Attention
    from moegpt.model.experts import DenseMLP, Experts
    from moegpt.model.moe import MoE

    cfg = model.cfg
    model.layers = nn.ModuleList(list(model.layers)[r.first_layer:r.last_layer])
    if shard_slices("embed.weight", cfg, r) is None:
        model.embed = None
    if not r.is_last_stage:
        model.lm_head = None
    tp, ep = r.dims.tp, r.dims.ep
    for module in model.modules():
        if isinstance(module, Attention):
            module.n_heads //= tp
            if kv_heads_split(cfg, tp):
                module.n_kv_heads //= tp
            if tp > 1:
                module.register_forward_hook(_sum_output(collectives))
        elif isinstance(module, (MoE, DenseMLP)):
            if tp > 1:
                module.register_forward_hook(_sum_output(collectives))
            if isinstance(module, MoE) and ep > 1:
                assert isinstance(module.experts, Experts)
                hooks = _ExpertParallelHooks(collectives)
                module.experts.register_forward_pre_hook(hooks.before)
                module.experts.register_forward_hook(hooks.after)
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"rank {r.rank}: {len(missing)} parameter(s) of its shard were not loaded, e.g. {missing[0]}")
    model.cfg = local_config(cfg, r)
    return model


def serve_groups(dims: ParallelDims, device_type: str, timeout_s: float = 120.0,
                 shared_memory: bool = True) -> ShardCollectives:
    """The process groups of a serving layout (call on every rank, after init_process_group). TP and
    EP ranks on one CPU machine exchange through shared memory (``shared_memory=False``: gloo's
    collectives, as across machines)."""
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device_type, (dims.pp, dims.ep, dims.tp), mesh_dim_names=SERVE_MESH_DIMS)

    def group_and_sum(dim: str, size: int):
        if size == 1:
            return None, None
        group = mesh[dim].get_group()
        one_machine = SharedMemorySum.applies(group, device_type)  # (every rank takes part: no short cut)
        return group, SharedMemorySum(group, timeout_s=timeout_s) if shared_memory and one_machine else None

    tp_group, tp_sum = group_and_sum("tp", dims.tp)
    ep_group, ep_sum = group_and_sum("ep", dims.ep)
    return ShardCollectives(tp_group=tp_group, ep_group=ep_group, tp_sum=tp_sum, ep_sum=ep_sum,
                            pipe_group=dist.new_group(list(range(dims.world_size))) if dims.pp > 1 else None)
