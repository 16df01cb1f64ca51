"""Sharded serving on this CPU: decode tokens/s of each serving layout (one process, TP2, PP2, EP2,
gloo, one thread per rank) beside the planner's prediction for the same layout on ``local``
hardware, each rank's peak memory (RSS), and the measured pipeline bubble.

Informational: two cores cannot make a sharded model faster, the collectives and the step plan
broadcast cost what the split saves. Speed: the ``tiny`` preset (random weights, fp32), a batch of 8
prompts of 32 tokens, 32 greedy tokens each, decode steps only; median of 3 repeats. Memory: the
``small`` preset (0.52B parameters, 2.1 GB in fp32), in fp32 and quantized to int8, loaded by each
layout's ranks: the weight bytes each rank holds (packed bytes and scales for quantized weights) and
its peak RSS (each rank reads only its slices of the directory).

    python -m bench.serve_layouts
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import write_result
from moegpt.checkpoint.model_dir import read_config, save
from moegpt.config import preset
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model
from moegpt.planner.cli import default_cache_dir
from moegpt.planner.inputs import make_inputs
from moegpt.planner.local import local_hardware
from moegpt.planner.plan import plan
from moegpt.quant.model import quantize_model
from moegpt.quant.scheme import parse_scheme

ROOT = Path(__file__).resolve().parent.parent
LAYOUTS = [(1, 1, 1), (2, 1, 1), (1, 2, 1), (1, 1, 2)]  # (tp, pp, ep)
WORKER = Path(__file__).parent / "serve_layouts_worker.py"


def ranks_of(hw, n: int):
    """``local`` as n ranks sharing it: each rank a device with 1/n of the measured bandwidth and peaks,
    all in one fast domain (one machine's memory)."""
    if n == 1:
        return hw
    peaks = dataclasses.replace(hw.peak_flops, **{f.name: getattr(hw.peak_flops, f.name) / n
                                                  for f in dataclasses.fields(hw.peak_flops)
                                                  if isinstance(getattr(hw.peak_flops, f.name), (int, float))})
    return dataclasses.replace(hw, mem_bytes=hw.mem_bytes / n, hbm_bytes_per_s=hw.hbm_bytes_per_s / n, peak_flops=peaks,
                               peak_flops_fp32=hw.peak_flops_fp32 / n if hw.peak_flops_fp32 else None,
                               gpus_per_nvlink_domain=n, nvlink_bytes_per_s=hw.nvlink_bytes_per_s or hw.hbm_bytes_per_s)


def run(model_dir: str, tp: int, pp: int, ep: int, mode: str = "speed") -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // (tp * pp * ep))), "PYTHONPATH": str(ROOT),
               "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
        subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        f"--nproc-per-node={tp * pp * ep}", str(WORKER), model_dir, out.name, str(tp), str(pp), str(ep), mode],
                       env=env, check=True, capture_output=True, text=True)
        return json.loads(Path(out.name).read_text())


def main() -> None:
    from bench.serve_layouts_worker import BATCH, NEW, PROMPT

    hw = local_hardware(default_cache_dir())
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer.train(["to be or not to be, that is the question\n" * 50], vocab_size=300)
        save(build_model(preset("tiny"), seed=0), tok, d)
        cfg = read_config(d)
        for tp, pp, ep in LAYOUTS:
            inp = make_inputs(preset=d, model=cfg, hardware=ranks_of(hw, tp * pp * ep), tp=tp, pp=pp, ep=ep,
                              gpus=tp * pp * ep, batch=BATCH,
                              context=PROMPT + NEW // 2, weight_bytes=4, kv_bytes=4, embedding_lookup=True)
            predicted = plan(inp).decode.cluster_tokens_per_s
            got = run(d, tp, pp, ep)
            name = "x".join(f"{k}{v}" for k, v in (("TP", tp), ("PP", pp), ("EP", ep)) if v > 1) or "1 process"
            rows.append({"layout": name, "tp": tp, "pp": pp, "ep": ep, "measured_tokens_per_s": got["tokens_per_s"],
                         "planner_tokens_per_s": predicted, "peak_rss_mb": got["peak_rss_mb"],
                         "bubbles": got["bubbles"], "busy_ms_per_step": got["busy_ms_per_step"],
                         "wall_ms_per_step": got["wall_ms_per_step"], "repeats": got["repeats"]})
            print(f"{name:>10}: measured {got['tokens_per_s']:7.1f} tok/s   planner (local) {predicted:8.1f} tok/s   "
                  f"peak RSS per rank {', '.join(f'{m:.0f}' for m in got['peak_rss_mb'])} MB   "
                  f"bubble {', '.join(f'{b:.2f}' for b in got['bubbles'])} (busy / step ms per rank "
                  f"{', '.join(f'{b:.2f}/{w:.2f}' for b, w in zip(got['busy_ms_per_step'], got['wall_ms_per_step']))})",
                  flush=True)
        memory = []
        for scheme in ("fp32", "int8"):
            small = str(Path(d) / f"small-{scheme}")
            model = build_model(preset("small"), seed=0)
            save(model if scheme == "fp32" else quantize_model(model, parse_scheme(scheme)), tok, small)
            del model
            for tp, pp, ep in LAYOUTS:
                got = run(small, tp, pp, ep, "memory")
                name = "x".join(f"{k}{v}" for k, v in (("TP", tp), ("PP", pp), ("EP", ep)) if v > 1) or "1 process"
                memory.append({"layout": name, "weights": scheme, **got})
                print(f"{name:>10} (small {scheme}): weights per rank {', '.join(f'{w:.0f}' for w in got['weights_mb'])}"
                      f" MB   peak RSS per rank {', '.join(f'{m:.0f}' for m in got['peak_rss_mb'])} MB", flush=True)
            shutil.rmtree(small)
    print("wrote", write_result("serve_layouts", {"preset": "tiny", "batch": BATCH, "prompt": PROMPT, "new": NEW,
                                                  "rows": rows, "memory_preset": "small", "memory": memory}))


if __name__ == "__main__":
    main()
