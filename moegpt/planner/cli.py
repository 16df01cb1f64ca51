"""``moegpt plan``: the planner's subcommand. ``add_plan_parser(subparsers, decode_measurers)`` adds it;
``cmd_plan(args)`` runs it. ``decode_measurers`` makes the functions ``--measure-efficiency`` times
the engine with (the main CLI passes the engine's, moegpt.infer.measure: the planner never imports it). Bad input raises a one-line ValueError naming the value (the main CLI prints it, exit 2).

Three uses: a plan (a table, or ``--json`` with PLANNER.md's fields), ``--article`` (every figure of
the article beside ours; ``--markdown`` for docs/article.md), and ``--plot DIR`` (the charts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from typing import TYPE_CHECKING, Callable

from moegpt.counts import KV_SCALE_BYTES
from moegpt.planner.hardware import HARDWARE_NAMES

if TYPE_CHECKING:
    from moegpt.planner.local_decode import DecodeMeasurers

# flag -> ModelConfig field, for the model overrides applied on top of a preset
OVERRIDES = {"n_layers": "n_layers", "d_model": "d_model", "n_heads": "n_heads", "n_kv_heads": "n_kv_heads",
             "head_dim": "head_dim", "d_ff": "d_ff", "n_experts": "n_experts", "top_k": "top_k", "vocab": "vocab_size"}


def number(text: str) -> int | float:
    """'8', '60e6', '2.15e25', '-1' -> a number (an int when integral); the checks come later."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    return int(value) if value.is_integer() and abs(value) < 2**63 else value


def add_plan_parser(subparsers, decode_measurers: Callable[[], DecodeMeasurers] | None = None) -> argparse.ArgumentParser:
    p = subparsers.add_parser("plan", help="the article's arithmetic: params, FLOPs, memory, latency, MFU, cost",
                              description=__doc__.split("\n\n")[1])
    n = dict(type=number, default=None)
    g = p.add_argument_group("model")
    g.add_argument("--preset", default="gpt4", help="gpt4 (default), gpt4-mha, gpt4-gqa, dense-1t, palm540b-mha, "
                   "davinci, or a model preset")
    g.add_argument("--model", default=None, metavar="DIR", help="a model directory (its config.json) instead")
    for flag in OVERRIDES:
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, **n)
    g.add_argument("--gated-mlp", action=argparse.BooleanOptionalAction, default=None, help="SwiGLU (else GELU)")
    g.add_argument("--tied-embeddings", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--params", **n, help="set the depth so the total comes nearest this many parameters")
    g.add_argument("--vision", default=None, metavar="TOWER",
                   help="a Flamingo-style image side joined to the model (tiny, clip-vit-b-16, clip-vit-l-14, "
                        "siglip-so400m-14-384): the vision section; a --model directory with one brings its own")
    g.add_argument("--cross-attention-every", type=number, default=None,
                   help="with --vision: a gated cross-attention block before every Nth layer (default 4)")
    g = p.add_argument_group("hardware and layout")
    g.add_argument("--hardware", default="a100-40gb", help=f"one of {', '.join(HARDWARE_NAMES)}")
    g.add_argument("--cache-dir", default=None, help="where `local` is cached ($MOEGPT_CACHE or ~/.cache/moegpt)")
    g.add_argument("--remeasure", action="store_true", help="measure `local` again")
    for flag in ("tp", "pp", "ep"):
        g.add_argument("--" + flag, type=number, default=1)
    g.add_argument("--dp", **n)
    g.add_argument("--gpus", **n, help="total GPUs; dp = gpus / (tp * pp)")
    g.add_argument("--mode", default="inference", help="inference (default) or train")
    g.add_argument("--kv-sharding", default="replicated", help="replicated (default) or batch")
    g.add_argument("--zero-stage", type=number, default=0)
    g.add_argument("--micro-batch", type=number, default=1)
    g = p.add_argument_group("workload and precision")
    g.add_argument("--batch", type=number, default=1, help="sequences decoded together (inference)")
    for flag in ("context", "seq_len", "batch_tokens", "tokens", "train_flops", "compare_tokens"):
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, **n)
    g.add_argument("--weight-bytes", type=number, default=None,
                   help="0.5 (int4), 1, 2 or 4 (fp32: --hardware local only); default 2, or --model DIR's dtype "
                        "(its quantized bits / 8 for a quantized directory)")
    g.add_argument("--kv-bytes", type=number, default=None, help="1, 2 or 4; default 2, or --model DIR's dtype")
    g.add_argument("--kv-cache-dtype", choices=["int8", "fp8"], default=None,
                   help="the engine's 8-bit KV cache: 1 byte per value and a 4-byte scale per token and kv head "
                        "(instead of --kv-bytes)")
    g = p.add_argument_group("efficiency and prices")
    g.add_argument("--mfu", **n)
    g.add_argument("--hbm-efficiency", type=number, default=None, help="fraction of the HBM bandwidth reached "
                   "(default 1)")
    for flag in ("flops_efficiency", "overhead_factor"):
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, type=number, default=1.0)
    g.add_argument("--measure-efficiency", action=argparse.BooleanOptionalAction, default=None,
                   help="with --hardware local: measure hbm_efficiency for this model, batch and context (the "
                   "step's matmuls at the model's shapes + the engine's per-step software time; a few seconds, not "
                   "cached) and plan with it (refinement; default: on for --hardware local --model DIR in "
                   "inference mode on one device without --hbm-efficiency, off otherwise)")
    for flag in ("days", "gpu_hour_usd", "target_tps", "words_per_min", "tokens_per_word", "draft_tokens",
                 "acceptance_rate", "nic_gbps_per_gpu"):
        g.add_argument("--" + flag.replace("_", "-"), dest=flag, **n)
    for kind in ("text", "vision"):
        g.add_argument(f"--bytes-per-token-{kind}", dest=f"bytes_per_token_{kind}", **n,
                       help=f"I/O per {kind} training token (default with a vision --model DIR: what its training "
                            f"measured, {'the bundled text' if kind == 'text' else 'raw pixels per image token'})")
    g.add_argument("--tokens-per-param", type=number, default=20)
    g.add_argument("--embedding-lookup", action=argparse.BooleanOptionalAction, default=None,
                   help="decode reads only the looked-up rows of an untied input embedding, and spends no FLOPs "
                   "on them (refinement; default: on for --hardware local, off otherwise)")
    g.add_argument("--compare-preset", default="davinci")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="PLANNER.md's JSON instead of the table")
    g.add_argument("--article", action="store_true", help="the article's figures beside ours, with verdicts")
    g.add_argument("--markdown", action="store_true", help="with --article: docs/article.md's Markdown")
    g.add_argument("--plot", default=None, metavar="DIR", help="write the charts (PNG) into DIR")
    p.set_defaults(func=cmd_plan, decode_measurers=decode_measurers)
    return p


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOEGPT_CACHE", Path.home() / ".cache" / "moegpt"))


def inputs_from_args(args):
    from moegpt.planner.inputs import make_inputs

    measure = args.measure_efficiency
    if measure is None:  # the default: predict what our engine does with this model here
        measure = (args.hardware == "local" and args.model is not None and args.mode == "inference"
                   and args.pp == 1 and args.ep == 1 and args.hbm_efficiency is None)
    elif measure:  # asked for: checked before anything is measured
        from moegpt.planner.local_decode import check_measurable

        check_measurable(args.hardware, args.mode, args.pp, args.ep)
        if args.hbm_efficiency is not None:
            raise ValueError(f"--hbm-efficiency {args.hbm_efficiency:g} and --measure-efficiency: give one "
                             "(the second measures the first)")
    hardware = args.hardware
    if hardware == "local":
        from moegpt.planner.local import local_hardware

        cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
        hardware = local_hardware(cache_dir, remeasure=args.remeasure)
    model, preset, vision, measured_io = None, args.preset, None, {}
    default_bytes = default_weight_bytes = 2
    if args.model is not None:
        from moegpt.checkpoint.model_dir import read_config
        from moegpt.checkpoint.vision_dir import has_vision, read_vision_config, read_vision_io
        from moegpt.planner.inputs import model_dir_bytes, model_dir_weight_bytes

        model, preset = read_config(args.model), str(args.model)
        default_bytes = model_dir_bytes(args.model)  # fp32 directories: 4-byte weights and KV
        default_weight_bytes = model_dir_weight_bytes(args.model)  # quantized directories: bits / 8
        if has_vision(Path(args.model)):  # its image side, and the I/O per token its training measured
            vision = read_vision_config(Path(args.model))
            measured_io = read_vision_io(Path(args.model)) or {}
    overrides = {field: getattr(args, flag) for flag, field in OVERRIDES.items() if getattr(args, flag) is not None}
    if args.gated_mlp is not None:
        overrides["mlp"] = "swiglu" if args.gated_mlp else "gelu"
    if args.tied_embeddings is not None:
        overrides["tie_embeddings"] = args.tied_embeddings
    byte_widths = {flag: default if getattr(args, flag) is None else getattr(args, flag)
                   for flag, default in (("weight_bytes", default_weight_bytes), ("kv_bytes", default_bytes))}
    if args.kv_cache_dtype is not None:
        if args.kv_bytes is not None:
            raise ValueError(f"--kv-bytes {args.kv_bytes} and --kv-cache-dtype {args.kv_cache_dtype}: give one")
        byte_widths.update(kv_bytes=1, kv_scale_bytes=KV_SCALE_BYTES)
    names = ("tp", "pp", "dp", "gpus", "ep", "mode", "batch", "context", "seq_len", "batch_tokens", "tokens",
             "kv_sharding", "zero_stage", "micro_batch", "mfu", "hbm_efficiency",
             "flops_efficiency", "overhead_factor", "days", "gpu_hour_usd", "target_tps", "words_per_min",
             "tokens_per_word", "draft_tokens", "acceptance_rate", "compare_preset", "compare_tokens",
             "train_flops", "tokens_per_param", "nic_gbps_per_gpu", "bytes_per_token_text", "bytes_per_token_vision",
             "params", "embedding_lookup")
    values = {k: getattr(args, k) for k in names}
    if values["hbm_efficiency"] is None:
        values["hbm_efficiency"] = 1.0
    for kind in ("text", "vision"):
        if values[f"bytes_per_token_{kind}"] is None:
            values[f"bytes_per_token_{kind}"] = measured_io.get(f"{kind}_bytes_per_token")
    inp = make_inputs(preset=preset, model=model, overrides=overrides, hardware=hardware, **byte_widths, **values,
                      vision=vision, vision_tower=args.vision, cross_attention_every=args.cross_attention_every)
    if measure:
        from moegpt.planner.local_decode import measure_decode_efficiency, with_measured_efficiency

        if args.decode_measurers is None:
            raise ValueError("--measure-efficiency: this parser was built without the engine's measurers "
                             "(run it as `moegpt plan`)")
        inp = with_measured_efficiency(inp, measure_decode_efficiency(inp, args.decode_measurers()))
    return inp


def cmd_plan(args) -> int:
    if args.markdown and not args.article:
        raise ValueError("--markdown goes with --article")
    if args.plot is not None:
        from moegpt.planner.plots import write_plots

        try:
            paths = write_plots(Path(args.plot))
        except OSError as e:
            raise ValueError(f"--plot {args.plot}: {e.strerror or e}") from None
        for path in paths:
            print(path)
        return 0
    if args.article:
        from moegpt.planner.article import article_markdown, article_rows, article_table

        if args.json:
            print(json.dumps([r.to_dict() for r in article_rows()], indent=2))
        else:
            sys.stdout.write(article_markdown() if args.markdown else article_table() + "\n")
        return 0
    from moegpt.planner.plan import plan
    from moegpt.planner.table import render

    result = plan(inputs_from_args(args))
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0
