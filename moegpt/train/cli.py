"""``moegpt train``: its flags, generated from TrainConfig's fields, and the run for one process or
every rank under torchrun (the same Trainer either way).

Every training option is declared once, as a TrainConfig field with its help text; the flag is the
field's name with dashes (``lr`` -> ``--lr``, ``batch_start`` -> ``--batch-start``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import types
import typing
from pathlib import Path


def add_config_flags(parser: argparse.ArgumentParser, cls: type, shown: dict[str, str] | None = None) -> None:
    """One flag per field of the dataclass ``cls``: its type, default and help text (``metadata``);
    ``shown``: the default a command applies itself, as its help shows it, for the fields it names."""
    shown = shown or {}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind, flag = hints[f.name], "--" + f.name.replace("_", "-")
        options = typing.get_args(kind)
        if isinstance(kind, types.UnionType) and type(None) in options:  # X | None: X, default None
            kind = next(t for t in options if t is not type(None))
        help_text = f.metadata.get("help")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                                help=help_text)
        else:
            default = ("" if f.default is None else f" (default: {f.default:g})" if kind is float
                       else f" (default: {f.default})")
            if f.name in shown:
                default = f" (default: {shown[f.name]})"
            parser.add_argument(flag, dest=f.name, type=kind, default=f.default, metavar=f.name.upper(),
                                help=(help_text or "") + default)


def config_from_args(cls: type, args: argparse.Namespace):
    """The dataclass ``cls`` from the flags ``add_config_flags`` made (its own checks run)."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_train_args(p: argparse.ArgumentParser) -> None:
    from moegpt.train.config import TrainConfig

    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field of the preset, e.g. --set n_layers=2 (repeatable)")
    add_config_flags(p.add_argument_group("training (TrainConfig)"), TrainConfig)
    p.add_argument("--data", default="text:2,code:4",
                   help="mixture as name:epochs,... (text, code, or name=PATH:epochs); default text:2,code:4")
    p.add_argument("--cache-dir", default=None, help="token cache (default: $MOEGPT_CACHE or ~/.cache/moegpt)")
    p.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("distributed (under torchrun; gloo on CPU, NCCL on GPU)")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel degree")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel degree")
    g.add_argument("--dp", type=int, default=None, help="data-parallel degree (default: world / (tp*pp*ep))")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--fsdp", action="store_true", help="shard parameters/gradients/optimizer (FSDP2)")
    mode.add_argument("--zero1", action="store_true", help="DDP + ZeroRedundancyOptimizer (ZeRO-1)")
    g.add_argument("--hsdp-replicas", type=int, default=1, help="with --fsdp: replica groups (HSDP)")
    g.add_argument("--pp-schedule", default="1f1b", choices=["gpipe", "1f1b", "interleaved-1f1b"])
    g.add_argument("--virtual-stages", type=int, default=1, help="stages per pipeline rank (interleaved)")
    g.add_argument("--first-stage-layers", type=int, default=None, help="layers of pipeline stage 0")
    g.add_argument("--record-samples", action="store_true", help="log the sample ids of every step")


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    if text.lower() == "none":
        return None
    return text


def model_config_from_args(args):
    from moegpt.config import preset

    cfg = preset(args.preset)
    overrides = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        overrides[key.strip()] = _parse_value(value.strip())
    return cfg.replace(**overrides) if overrides else cfg


def train_config_from_args(args):
    from moegpt.train.config import TrainConfig

    return config_from_args(TrainConfig, args)


def parallel_dims_from_args(args):
    """The layout the flags ask for, or None for one process (no torchrun, no parallel flag)."""
    from moegpt.parallel import ParallelDims

    if not hasattr(args, "tp"):  # a command without the parallel flags (the demo)
        return None
    parallel = [getattr(args, k) not in (1, None) for k in ("tp", "pp", "ep", "dp")]
    if "WORLD_SIZE" not in os.environ and not any(parallel) and not args.fsdp and not args.zero1:
        return None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = args.dp if args.dp is not None else max(1, world // (args.tp * args.pp * args.ep))
    mode = "fsdp" if args.fsdp else "zero1" if args.zero1 else "replicate"
    return ParallelDims(dp=dp, tp=args.tp, pp=args.pp, ep=args.ep, data_parallel=mode,
                        dp_replicate=args.hsdp_replicas, schedule=args.pp_schedule,
                        virtual_stages=args.virtual_stages, first_stage_layers=args.first_stage_layers)


@contextlib.contextmanager
def stop_on_signals():
    """While training, SIGINT/SIGTERM finish the current step, write a checkpoint and stop (a second
    signal aborts at once). The previous handlers come back afterwards."""
    event = threading.Event()

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        print(f"\nmoegpt: signal {signum}: checkpointing after this step (again to abort)", file=sys.stderr)
        event.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield event
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextlib.contextmanager
def process_group(dims):
    """The torchrun group for a layout (its device), or nothing for one process (the CPU)."""
    import torch

    if dims is None:
        yield torch.device("cpu")
        return
    import torch.distributed as dist

    from moegpt.parallel.process_group import close_distributed, init_distributed

    device = init_distributed()
    try:
        yield device
    except BaseException:
        dist.destroy_process_group()  # no barrier: the other ranks may be gone
        raise
    close_distributed()


def print_row(row: dict, log_every: int) -> None:
    """One line per logged step of a layout (rank 0), with the layout's own fields."""
    if row["step"] % log_every and "val_loss" not in row:
        return
    val = f" val {row['val_loss']:.3f}" if "val_loss" in row else ""
    print(f"step {row['step']:5d} loss {row['loss']:.4f}{val} lr {row['lr']:.2e} batch {row['batch_size']} "
          f"{row['tokens_per_s']:.0f} tok/s mfu {row['mfu']:.2%} [{row['layout']}] "
          f"expert load per EP rank {row['ep_load']} peak MiB/rank {row['peak_mem_mb']}", flush=True)


def run_training(args, out: Path, resume: bool, before_setup=None, after_setup=None, finetune=None):
    """Check every input, then set up (tokenizer, data, model) and train, in one process or on every
    rank of a torchrun layout. The hooks run around the set-up (the demo clears its directory
    before, and marks it as its own after). ``finetune`` (train/finetune.py): start from its model
    and read ``args.data`` as conversation sources. Returns (trainer, result)."""
    from moegpt.counts import param_counts
    from moegpt.data.sft import conversations_digest, parse_conversation_mixture
    from moegpt.data.sources import parse_mixture
    from moegpt.data.vision_data import parse_vision_mixture
    from moegpt.train.trainer import Trainer, default_cache_dir
    from moegpt.train.vision import VisionTraining

    train_cfg = train_config_from_args(args)
    vision = isinstance(finetune, VisionTraining)
    if finetune is None:
        model_cfg, sources = model_config_from_args(args), parse_mixture(args.data)
    elif vision:
        model_cfg, sources = finetune.model_cfg, parse_vision_mixture(args.data)
    else:
        model_cfg = finetune.model_cfg
        # a context extension's pass keys are at least the original context long: the base retrieves
        # within it already, and the rows' compute goes to the distances it has never seen
        extends = "context" in finetune.settings
        sources = parse_conversation_mixture(
            args.data, train_cfg.val_fraction, train_cfg.seed, max_tokens=train_cfg.seq_len + 1,
            min_tokens=model_cfg.rope_scaling.original_max_seq_len if extends else None,
            count_tokens=lambda conv: len(finetune.chat.tokens(finetune.tokenizer, list(conv))[0]))
        # the conversations themselves, so a resume refuses a data file edited since
        finetune = dataclasses.replace(finetune, settings={**finetune.settings,
                                                           "conversations_sha256": conversations_digest(sources)})
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    dims = parallel_dims_from_args(args)
    if dims is not None:  # checked before any process group or data work
        dims.validate(int(os.environ.get("WORLD_SIZE", "1")), model_cfg)
        if vision and ((dims.tp, dims.pp, dims.ep) != (1, 1, 1) or args.fsdp):
            raise ValueError(f"layout {dims.describe()}: vision training runs data parallel only (--dp, --zero1), "
                             f"not --tp {dims.tp} --pp {dims.pp} --ep {dims.ep}{' --fsdp' if args.fsdp else ''}")
        if finetune is not None and dims.pp > 1:
            raise ValueError(f"--pp {dims.pp}: fine-tuning's packed rows do not run through a pipeline yet "
                             "(use --tp, --ep, --dp, --fsdp or --zero1)")
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(f"layout {dims.describe()} needs torchrun: torchrun --nproc-per-node N -m moegpt train ...")
    with process_group(dims) as device:
        if dims is not None and not resume:  # torchrun restarted the group after a failure: resume
            from moegpt.parallel.checkpoint import latest
            from moegpt.parallel.process_group import restart_count

            resume = restart_count() > 0 and latest(out / "checkpoints") is not None
        if before_setup is not None:
            before_setup()
        trainer = Trainer(model_cfg, train_cfg, out, sources, cache_dir, resume=resume, dims=dims, device=device,
                          record_samples=getattr(args, "record_samples", False), finetune=finetune)
        if after_setup is not None:
            after_setup()
        main = trainer.runtime.is_main
        if main:
            counts = param_counts(model_cfg)
            if vision:
                from moegpt.counts import vision_param_counts

                added = vision_param_counts(finetune.vision_cfg)
                print(f"moegpt: vision adds {added.added / 1e6:.2f}M params (tower {added.tower / 1e6:.2f}M, resampler "
                      f"{added.resampler / 1e6:.2f}M, gated cross-attention {added.cross_attention / 1e6:.2f}M); "
                      f"training {', '.join(k for k, on in _vision_parts(finetune).items() if on)}", flush=True)
                io = trainer.data.bytes_per_token()
                print("moegpt: I/O per training token: " + ", ".join(f"{k} {v:.1f}" for k, v in io.items()), flush=True)
                from moegpt.checkpoint.vision_dir import write_vision_io

                write_vision_io(out, io)  # (the planner reads it: moegpt plan --model OUT)
            where = "" if dims is None else f" on {trainer.runtime.world_size} ranks, layout {dims.describe()},"
            what = args.preset if finetune is None else f"from {args.model}"
            dropped = getattr(trainer.data, "dropped", {})
            if dropped:
                print(f"moegpt: dropped conversations longer than a row ({train_cfg.seq_len + 1} tokens): "
                      + ", ".join(f"{n} {k}" for k, n in dropped.items()), flush=True)
            print(f"moegpt: training {what}: {counts.total / 1e6:.2f}M params "
                  f"({counts.active_per_token / 1e6:.2f}M active/token), "
                  f"data {', '.join(f'{n} x{e:g}' for n, e in zip(trainer.data.names, trainer.data.epochs))},"
                  f"{where} from step {trainer.step} to {train_cfg.steps}", flush=True)
        # one process shows a progress bar; a layout's rank 0 prints a line per logged step
        bar = main and dims is None and not args.no_progress
        lines = main and dims is not None
        with stop_on_signals() as stop:
            result = trainer.run(stop_at=args.stop_at, stop_requested=stop, progress=bar,
                                 on_step=(lambda row: print_row(row, train_cfg.log_every)) if lines else None)
        if main:
            seen = ", ".join(f"{name} {epochs:.2f}" for name, epochs in trainer.epochs_seen().items())
            print(f"epochs seen so far: {seen} (targets for a whole pass: "
                  f"{', '.join(f'{n} {e:g}' for n, e in zip(trainer.data.names, trainer.data.epochs))})")
            print(f"validation loss (nats/token; unigram baseline {result.unigram_baseline:.3f}):")
            for step, val in result.val_losses:
                print(f"  step {step:6d}  {val:.3f}")
            print(f"model directory: {out}" if result.finished else
                  f"stopped at step {result.step}; continue with --resume --out {out}", flush=True)
    return trainer, result


def _vision_parts(vision) -> dict[str, bool]:
    return {"text model": vision.train_text, "tower": vision.train_tower, "resampler": True, "gated blocks": True}


def add_train_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a model (one process, or every rank under torchrun)")
    add_train_args(p)
    add_parallel_args(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=cmd_train)
    return p


# Measured on the tiny demo model and the generated instruction set (docs/finetune.md): lr 3e-3 beat
# 1e-3 and 5e-3; 1500 steps (a pass over its 100,000 training conversations, two over the copy rows)
# take ~11 min on 2 cores, evaluation included, and beat 1100 (61.5% vs 52.5% exact match, without
# copy rows); copy rows beside the instructions (the second copy the target) took it to 79% (copy:1)
# and 81.5-84% (copy:2).
FINETUNE_DATA = "instructions:1,copy:2"
FINETUNE_DEFAULTS = {"steps": 1500, "seq_len": 256, "lr": 3e-3, "warmup_steps": 20, "eval_every": 100,
                     "ckpt_every": 100}
# With --context: rows of the extended length, passkey conversations beside plain text (docs/finetune.md).
CONTEXT_DEFAULTS = {"data": "passkey:1,text:1", "steps": 600, "lr": 1e-3, "batch_size": 8, "micro_batch": 4}


def finetune_defaults_shown() -> dict[str, str]:
    """The defaults ``apply_finetune_defaults`` fills in, as the help shows them."""
    from moegpt.train.config import TrainConfig

    def text(v) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    shown = {k: text(v) for k, v in FINETUNE_DEFAULTS.items()}
    for key, value in CONTEXT_DEFAULTS.items():
        if key in fields:
            shown[key] = f"{shown.get(key, text(fields[key]))}; with --context {text(value)}"
    shown["seq_len"] += "; with --context the extended length"
    return shown


def add_finetune_parser(subparsers, func) -> argparse.ArgumentParser:
    """``moegpt finetune``: the training flags (fine-tuning defaults) and what fine-tuning adds;
    ``func`` runs it (the top-level CLI's, which evaluates the result with the inference engine)."""
    from moegpt.train.config import TrainConfig

    p = subparsers.add_parser("finetune", help="instruction-tune a model directory on chat conversations")
    p.add_argument("--model", required=True, help="the model directory to start from")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, the tuned model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--data", default=None,
                   help="sources as name:epochs,...: instructions or passkey (generated), text or code (the "
                        "bundled corpora as plain text), NAME=FILE.jsonl (OpenAI-style messages), NAME=PATH (a "
                        "text file or directory), copy (corpus spans each followed by itself: teaches copying); "
                        f"default {FINETUNE_DATA}, with --context {CONTEXT_DEFAULTS['data']}")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template (default: the model's, else moegpt's ChatML)")
    p.add_argument("--no-packing", action="store_true", help="one conversation per row (default: packed)")
    p.add_argument("--long", choices=["drop", "error"], default="drop",
                   help="conversations longer than a row: drop them (counted) or refuse to start")
    p.add_argument("--context", default=None, metavar="4x|TOKENS",
                   help="extend the context: a factor of the model's max_seq_len (4x) or a length; rows "
                        "default to that length")
    p.add_argument("--rope-scaling", choices=["linear", "dynamic", "yarn"], default="yarn",
                   help="how --context stretches RoPE (default yarn)")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="with --context: the pre-trained model (same context as --model) whose text perplexity "
                        "the report compares the extension's with (default: --model; give it when --model was "
                        "tuned at its context first, e.g. on pass keys)")
    p.add_argument("--passkey-per-cell", type=int, default=20,
                   help="with --context: passkey conversations per length and depth in the report")
    p.add_argument("--eval-max", type=int, default=200, help="held-out conversations per source for exact match")
    p.add_argument("--no-eval", action="store_true", help="skip the exact-match evaluation")
    add_config_flags(p.add_argument_group("training (TrainConfig; fine-tuning defaults)"), TrainConfig,
                     finetune_defaults_shown())
    add_parallel_args(p)
    p.set_defaults(**{k: None for k in {**FINETUNE_DEFAULTS, **CONTEXT_DEFAULTS}})  # apply_finetune_defaults
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=func)
    return p


# Sized for the tiny demo model on 2 cores (docs/vision.md): ~0.6 s a step, so 1200 steps in ~12
# minutes; short rows (a prompt, an image token, a line of text); the router losses off, since the
# routers are frozen.
VISION_PRETRAIN_STEPS = 600
VISION_DEFAULTS = {"steps": 1200, "seq_len": 64, "batch_size": 32, "micro_batch": 32, "lr": 1e-3, "warmup_steps": 50,
                   "eval_every": 200, "ckpt_every": 200, "eval_sequences": 200, "aux_loss_coef": 0.0,
                   "z_loss_coef": 0.0}


def add_vision_parser(subparsers, func) -> argparse.ArgumentParser:
    """``moegpt train-vision``: join a text model directory to an image side and train it to see."""
    from moegpt.train.config import TrainConfig

    p = subparsers.add_parser("train-vision", help="add Flamingo-style vision to a model directory and train it")
    p.add_argument("--model", required=True, help="the text model directory (its weights stay frozen by default)")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, the vision model directory)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--data", default="screenshots:1,shapes:1",
                   help="generated image sources as name:epochs,...: screenshots (rendered corpus lines to "
                        "transcribe), shapes (scenes to describe); default screenshots:1,shapes:1")
    p.add_argument("--tower", default="demo",
                   help="the image tower: a preset (demo, tiny, clip-vit-b-16, clip-vit-l-14, siglip-so400m-14-384: "
                        "fresh weights) or a CLIP / SigLIP vision model directory (default demo)")
    p.add_argument("--freeze-tower", action="store_true", help="keep a loaded tower's weights fixed")
    p.add_argument("--train-text", action="store_true", help="train the language model too (default: frozen)")
    p.add_argument("--cross-attention-every", type=int, default=1,
                   help="a gated cross-attention block before every Nth decoder layer (default 1)")
    p.add_argument("--latents", type=int, default=64, help="resampler latents per image (default 64, as Flamingo)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template (default: the model's, else moegpt's ChatML)")
    p.add_argument("--pretrain-steps", type=int, default=VISION_PRETRAIN_STEPS,
                   help="first train the tower and resampler on their own, this many steps naming what the pictures "
                        "show (scenes' fields, screenshots' characters) "
                        f"(Flamingo's order: docs/vision.md; default {VISION_PRETRAIN_STEPS}; 0: none)")
    p.add_argument("--pretrain-lr", type=float, default=1e-3, help="their learning rate (default 1e-3)")
    p.add_argument("--eval-max", type=int, default=200, help="held-out pictures per source for the accuracy report")
    p.add_argument("--no-eval", action="store_true", help="skip the accuracy report")
    add_config_flags(p.add_argument_group("training (TrainConfig; vision defaults)"), TrainConfig)
    add_parallel_args(p)  # data parallel only: --dp, --zero1
    p.set_defaults(**VISION_DEFAULTS)
    p.add_argument("--cache-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=func)
    return p


def apply_finetune_defaults(args: argparse.Namespace, context_len: int | None) -> None:
    """Fill the flags left unset: the fine-tuning defaults, or with --context (``context_len``, the
    extended length) the context-extension ones and rows of that length."""
    from moegpt.train.config import TrainConfig

    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | FINETUNE_DEFAULTS | {"data": FINETUNE_DATA}
    if context_len is not None:
        defaults |= CONTEXT_DEFAULTS | {"seq_len": context_len}
    for key, value in defaults.items():
        if getattr(args, key, None) is None and key in {**FINETUNE_DEFAULTS, **CONTEXT_DEFAULTS}:
            setattr(args, key, value)


def cmd_train(args) -> int:
    run_training(args, Path(args.out), args.resume)
    return 0
