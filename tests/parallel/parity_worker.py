"""Worker for the parity tests, started by torch.distributed.run: ``parity_worker.py OUT SCENARIO...``.

Each scenario is a layout (see ``LAYOUTS``). Every rank builds the same tiny model and the same
batches, parallelises the model, and trains a few steps with the distributed step; rank 0 also trains
the plain model in one process with the single-process ``train_step`` and writes, per scenario, the
largest loss and weight differences and whether the expert counts agree, to OUT/SCENARIO.json.
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from moegpt.config import ModelConfig
from moegpt.data.sft import PackedBatch, pack
from moegpt.model import build_model
from moegpt.parallel import ParallelDims, parallelize
from moegpt.parallel.checkpoint import full_state_dict
from moegpt.train.config import TrainConfig
from moegpt.train.optim import make_optimizer, make_parallel_optimizer
from moegpt.train.parallel_step import distributed_train_step
from moegpt.train.step import LossWeights, train_step

CFG = ModelConfig(vocab_size=128, d_model=32, n_layers=4, n_heads=4, n_kv_heads=1, d_ff=32, n_experts=4, top_k=2,
                  max_seq_len=32)
TRAIN = TrainConfig(lr=3e-3, warmup_steps=1, weight_decay=0.1, grad_clip=0.5)
BATCHES = (4, 8, 6, 8, 8)  # sequences per step with micro-batch 2: ramps, and leaves some ranks padding
MICRO, SEQ = 2, 16
WEIGHTS = LossWeights(aux=0.01, z=1e-3)

LAYOUTS = {
    "dp2": dict(dp=2), "zero1-dp2": dict(dp=2, data_parallel="zero1"), "fsdp-dp2": dict(dp=2, data_parallel="fsdp"),
    "tp2": dict(tp=2), "tp2-gqa": dict(tp=2), "ep2": dict(ep=2),
    "pp2-gpipe": dict(pp=2, schedule="gpipe"), "pp2-1f1b": dict(pp=2, schedule="1f1b", first_stage_layers=1),
    "pp2-interleaved": dict(pp=2, schedule="interleaved-1f1b", virtual_stages=2),
    "dp4": dict(dp=4), "zero1-dp4": dict(dp=4, data_parallel="zero1"), "fsdp-dp4": dict(dp=4, data_parallel="fsdp"),
    "hsdp-2x2": dict(dp=4, data_parallel="fsdp", dp_replicate=2),
    "tp2xdp2": dict(tp=2, dp=2), "tp2xfsdp2": dict(tp=2, dp=2, data_parallel="fsdp"),
    "pp2xdp2": dict(pp=2, dp=2, schedule="1f1b"), "ep2xdp2": dict(ep=2, dp=2), "ep4": dict(ep=4),
    "ep2xtp2": dict(ep=2, tp=2), "pp2xtp2": dict(pp=2, tp=2, schedule="1f1b"),
    "pp2xep2": dict(pp=2, ep=2, schedule="interleaved-1f1b", virtual_stages=2),
    "fsdp-pp2xdp2": dict(pp=2, dp=2, data_parallel="fsdp"), "fsdp-ep2xdp2": dict(ep=2, dp=2, data_parallel="fsdp"),
    "fsdp-ep2": dict(ep=2, data_parallel="fsdp"), "hsdp-2x1xep2": dict(dp=2, dp_replicate=2, ep=2, data_parallel="fsdp"),
    "zero1-tp2": dict(tp=2, data_parallel="zero1"), "zero1-pp2xtp2": dict(pp=2, tp=2, data_parallel="zero1"),
    "zero1-tp2xdp2": dict(tp=2, dp=2, data_parallel="zero1"), "zero1-ep2xdp2": dict(ep=2, dp=2, data_parallel="zero1"),
}


# Packed fine-tuning rows (data/sft.py): the same layouts, minus pipelines.
PACKED = ("dp2", "tp2", "ep2", "fsdp-dp2", "tp2xdp2", "ep2xdp2")
LAYOUTS.update({f"{name}-packed": LAYOUTS[name] for name in PACKED})

# Layouts that need another model shape: GQA with 2 KV heads, split over TP ranks instead of replicated.
CFG_OVERRIDES = {"tp2-gqa": dict(n_kv_heads=2)}


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, CFG.vocab_size, (b, SEQ + 1), generator=g) for b in BATCHES]


def packed_batches() -> list[PackedBatch]:
    """Rows of several conversations each (random lengths and assistant masks), as many as BATCHES says."""
    g = torch.Generator().manual_seed(4321)
    out = []
    for b in BATCHES:
        examples = []
        while True:
            n = int(torch.randint(3, 12, (1,), generator=g))
            ids = torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist()
            mask = (torch.rand(n, generator=g) < 0.5).tolist()
            mask[-1] = True  # at least one target
            examples.append((ids, mask))
            rows = pack(examples, SEQ, 0)
            if len(rows) > b:
                out.append(rows.rows(0, b))
                break
    return out


def step_batches(name: str) -> list:
    return packed_batches() if name.endswith("-packed") else batches()


def reference(cfg: ModelConfig, name: str) -> tuple[list[float], dict, torch.Tensor]:
    model = build_model(cfg, seed=0)
    opt = make_optimizer(model, TRAIN)
    losses, counts = [], []
    for b in step_batches(name):
        for g in opt.param_groups:
            g["lr"] = TRAIN.lr
        m = train_step(model, opt, b, MICRO, WEIGHTS, TRAIN.grad_clip)
        losses.append(m.loss)
        counts.append(m.expert_counts)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, torch.stack(counts)


def run(name: str, cfg: ModelConfig) -> tuple[list[float], dict | None, torch.Tensor]:
    layout = LAYOUTS[name]
    dims = ParallelDims(**layout)
    dims.validate(dist.get_world_size(), cfg)
    mesh = dims.build_mesh("cpu")
    pm = parallelize(build_model(cfg, seed=0), dims, mesh)
    opt = make_parallel_optimizer(pm, TRAIN)
    losses, counts, schedules = [], [], {}
    for b in step_batches(name):
        m = distributed_train_step(pm, opt, b, MICRO, WEIGHTS, TRAIN.grad_clip, cfg.n_moe_layers, cfg.n_experts,
                                   schedules)
        losses.append(m.loss)
        counts.append(m.expert_counts)
    return losses, full_state_dict(pm), torch.stack(counts)


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    refs = {}
    for name in sys.argv[2:]:
        cfg = CFG.replace(**CFG_OVERRIDES.get(name, {}))
        losses, weights, counts = run(name, cfg)
        if dist.get_rank() == 0:
            key = (cfg, name.endswith("-packed"))
            if key not in refs:
                refs[key] = reference(cfg, name)
            ref_losses, ref_weights, ref_counts = refs[key]
            weight_err = max(float((weights[k] - v).abs().max()) for k, v in ref_weights.items())
            try:
                for k, v in ref_weights.items():
                    torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-5, msg=k)
                close = None
            except AssertionError as e:
                close = str(e)
            (out / f"{name}.json").write_text(json.dumps({
                "losses": losses, "ref_losses": ref_losses,
                "max_loss_diff": max(abs(a - b) for a, b in zip(losses, ref_losses)),
                "max_weight_abs_diff": weight_err, "weights_mismatch": close,
                "same_keys": sorted(weights) == sorted(ref_weights),
                "counts_equal": bool(torch.equal(counts, ref_counts)),
            }))
        dist.barrier()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
