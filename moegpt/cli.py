"""The ``moegpt`` command: train | generate | serve | info | plan | demo.

Every subcommand validates its inputs before doing any work and reports bad input as one line,
``moegpt: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path


def _add_train_args(p: argparse.ArgumentParser) -> None:
    from moegpt.train.config import TrainConfig

    d = TrainConfig()
    p.add_argument("--preset", default="tiny", help="model preset (default: tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a ModelConfig field of the preset, e.g. --set n_layers=2 (repeatable)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step once ramped")
    p.add_argument("--micro-batch", type=int, default=d.micro_batch, help="sequences per forward/backward")
    p.add_argument("--batch-start", type=int, default=None, help="sequences per step at the start of the ramp")
    p.add_argument("--ramp-tokens", type=int, default=d.ramp_tokens, help="tokens over which the batch ramps up")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--grad-clip", type=float, default=d.grad_clip)
    p.add_argument("--aux-loss-coef", type=float, default=d.aux_loss_coef)
    p.add_argument("--z-loss-coef", type=float, default=d.z_loss_coef)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data", default="text:2,code:4",
                   help="mixture as name:epochs,... (text, code, or name=PATH:epochs); default text:2,code:4")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-sequences", type=int, default=d.eval_sequences,
                   help="validation sequences per source (default: the whole validation split)")
    p.add_argument("--ckpt-every", type=int, default=d.ckpt_every)
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints)
    p.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (default: measured)")
    p.add_argument("--cache-dir", default=None, help="token cache (default: $MOEGPT_CACHE or ~/.cache/moegpt)")
    p.add_argument("--stop-at", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


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

    return TrainConfig(
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, micro_batch=args.micro_batch,
        batch_start=args.batch_start, ramp_tokens=args.ramp_tokens, lr=args.lr, min_lr_ratio=args.min_lr_ratio,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, grad_clip=args.grad_clip,
        aux_loss_coef=args.aux_loss_coef, z_loss_coef=args.z_loss_coef, bf16=args.bf16, seed=args.seed,
        val_fraction=args.val_fraction, eval_every=args.eval_every, eval_sequences=args.eval_sequences,
        ckpt_every=args.ckpt_every, keep_checkpoints=args.keep_checkpoints, peak_flops=args.peak_flops,
    )


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


def run_training(args, out: Path, resume: bool, before_setup=None, after_setup=None):
    """Check every input, then set up (tokenizer, data, model) and train. The hooks run around the
    set-up (the demo clears its directory before, and marks it as its own after)."""
    from moegpt.data.sources import parse_mixture
    from moegpt.train.trainer import Trainer, default_cache_dir

    model_cfg, train_cfg = model_config_from_args(args), train_config_from_args(args)
    sources = parse_mixture(args.data)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if before_setup is not None:
        before_setup()
    trainer = Trainer(model_cfg, train_cfg, out, sources, cache_dir, resume=resume)
    if after_setup is not None:
        after_setup()
    from moegpt.counts import param_counts

    counts = param_counts(model_cfg)
    print(f"moegpt: training {args.preset}: {counts.total / 1e6:.2f}M params ({counts.active_per_token / 1e6:.2f}M active/token), "
          f"data {', '.join(f'{n} x{e:g}' for n, e in zip(trainer.data.names, trainer.data.epochs))}, "
          f"from step {trainer.step} to {train_cfg.steps}", flush=True)
    with stop_on_signals() as stop:
        result = trainer.run(stop_at=args.stop_at, stop_requested=stop, progress=not args.no_progress)
    seen = ", ".join(f"{name} {epochs:.2f}" for name, epochs in trainer.epochs_seen().items())
    print(f"epochs seen so far: {seen} (targets for a whole pass: "
          f"{', '.join(f'{n} {e:g}' for n, e in zip(trainer.data.names, trainer.data.epochs))})")
    print(f"validation loss (nats/token; unigram baseline {result.unigram_baseline:.3f}):")
    for step, val in result.val_losses:
        print(f"  step {step:6d}  {val:.3f}")
    if result.finished:
        print(f"model directory: {out}")
    else:
        print(f"stopped at step {result.step}; continue with --resume --out {out}")
    return trainer, result


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
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


def _is_distributed(args) -> bool:
    import os

    return ("WORLD_SIZE" in os.environ or any(getattr(args, k) not in (1, None) for k in ("tp", "pp", "ep", "dp"))
            or args.fsdp or args.zero1)


def run_distributed_training(args):
    """The torchrun path: every rank runs this; rank 0 prints and logs."""
    import os

    from moegpt.data.sources import parse_mixture
    from moegpt.parallel import ParallelDims
    from moegpt.train.distributed import DistributedTrainer, close_distributed, init_distributed, restart_count
    from moegpt.train.trainer import default_cache_dir
    from moegpt.parallel.checkpoint import latest

    model_cfg, train_cfg = model_config_from_args(args), train_config_from_args(args)
    sources = parse_mixture(args.data)
    cache_dir = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dp = args.dp if args.dp is not None else max(1, world // (args.tp * args.pp * args.ep))
    mode = "fsdp" if args.fsdp else "zero1" if args.zero1 else "replicate"
    dims = ParallelDims(dp=dp, tp=args.tp, pp=args.pp, ep=args.ep, data_parallel=mode,
                        dp_replicate=args.hsdp_replicas, schedule=args.pp_schedule,
                        virtual_stages=args.virtual_stages, first_stage_layers=args.first_stage_layers)
    dims.validate(world, model_cfg)  # before any process group or data work
    if "WORLD_SIZE" not in os.environ:
        raise ValueError(f"layout {dims.describe()} needs torchrun: torchrun --nproc-per-node N -m moegpt train ...")
    device = init_distributed()
    try:
        out = Path(args.out)
        # After a failure torchrun restarts every rank with the same command: resume if a checkpoint exists.
        resume = args.resume or (restart_count() > 0 and latest(out / "checkpoints") is not None)
        trainer = DistributedTrainer(model_cfg, train_cfg, dims, out, sources, cache_dir, resume=resume,
                                     device=device, record_samples=args.record_samples)
        if trainer.rank == 0:
            print(f"moegpt: training {args.preset} on {world} ranks, layout {dims.describe()}, "
                  f"from step {trainer.step} to {train_cfg.steps}", flush=True)
        result = trainer.run(stop_at=args.stop_at)
        if trainer.rank == 0:
            print(f"model directory: {out}" if result.finished else
                  f"stopped at step {result.step}; continue with --resume --out {out}", flush=True)
    except BaseException:
        import torch.distributed as dist

        dist.destroy_process_group()  # no barrier: the other ranks may be gone
        raise
    close_distributed()


def cmd_train(args) -> int:
    if _is_distributed(args):
        run_distributed_training(args)
        return 0
    run_training(args, Path(args.out), args.resume)
    return 0


def cmd_generate(args) -> int:
    from moegpt.infer.engine import EngineConfig, speculative_from_flags
    from moegpt.infer.llm import LLM
    from moegpt.infer.sampling_params import SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, seed=args.seed, stop=list(args.stop), max_tokens=args.max_tokens,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            repetition_penalty=args.repetition_penalty)
    spec = speculative_from_flags(bool(args.draft), args.ngram, args.speculative_tokens)
    llm = LLM(args.model, EngineConfig(speculative=spec), draft_model=args.draft)
    tok, engine = llm.tokenizer, llm.engine
    ids = tok.encode(args.prompt, add_bos=tok.bos_id is not None)
    texts: dict[int, list[str]] = {i: [] for i in range(args.n)}
    for update in engine.stream(ids, params):
        if args.n == 1:  # one completion: stream it as it comes
            if not texts[0]:
                sys.stdout.write(args.prompt)
            sys.stdout.write(update.text)
            sys.stdout.flush()
        texts[update.index].append(update.text)
    if args.n == 1:
        sys.stdout.write("\n")
    else:
        for i in range(args.n):
            print(f"--- completion {i}\n{args.prompt}{''.join(texts[i])}")
    stats = engine.stats
    if spec is not None:
        rate = f"{stats.spec_acceptance_rate:.2f}" if stats.spec_proposed else "-"
        print(f"speculative: {stats.spec_accepted}/{stats.spec_proposed} draft tokens accepted ({rate}), "
              f"{stats.generation_tokens / max(stats.steps, 1):.2f} tokens per target pass", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    from moegpt.config import preset
    from moegpt.counts import forward_flops_per_token, kv_cache_bytes_per_token, param_counts

    cfg = preset(args.preset)
    c = param_counts(cfg)
    info = {
        "preset": args.preset,
        "config": cfg.to_dict(),
        "params": c.to_dict(),
        "forward_flops_per_token": forward_flops_per_token(cfg),
        "forward_flops_per_token_at_context": forward_flops_per_token(cfg, args.context),
        "context": args.context,
        "kv_cache_bytes_per_token_fp16": kv_cache_bytes_per_token(cfg, 2),
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0

    def n(x: float) -> str:
        for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
            if x >= div:
                return f"{x / div:.3g}{unit}"
        return str(x)

    rows = [
        ("total parameters", n(c.total)), ("active per token", n(c.active_per_token)),
        ("attention", n(c.attention)), ("embedding (+ head)", n(c.embedding)),
        ("per expert (all layers)", n(c.per_expert)), ("all experts", n(c.experts_total)),
        ("router", n(c.router)), ("forward FLOPs/token", n(info["forward_flops_per_token"])),
        (f"forward FLOPs/token @ {args.context} ctx", n(info["forward_flops_per_token_at_context"])),
        ("KV cache bytes/token (fp16)", n(info["kv_cache_bytes_per_token_fp16"])),
    ]
    print(f"{args.preset}: {cfg.n_layers} layers, d_model {cfg.d_model}, {cfg.n_heads} heads x {cfg.head_dim}, "
          f"{cfg.n_kv_heads} KV head(s), {cfg.n_experts} experts top-{cfg.top_k} ({cfg.mlp.value}, d_ff {cfg.d_ff}), "
          f"vocab {cfg.vocab_size}")
    for label, value in rows:
        print(f"  {label:<34} {value:>10}")
    return 0


DEMO_PROMPTS = ("ROMEO:\n", "def fibonacci(n):\n")
DEMO_MARKER = ".moegpt-demo"


def cmd_demo(args) -> int:
    import torch

    from moegpt.infer.generate import generate
    from moegpt.infer.sampling_params import SamplingParams

    out = Path(args.out)
    marker = out / DEMO_MARKER
    if out.exists() and any(out.iterdir()) and not marker.exists():
        raise ValueError(f"--out {out} is not empty and was not made by 'moegpt demo'; choose another --out")

    def start_afresh():  # the demo's own directory is replaced on each run
        import shutil

        if marker.exists():
            shutil.rmtree(out)
        out.mkdir(parents=True)

    def mark():
        marker.write_text("made by 'moegpt demo', which replaces this directory on each run\n")

    trainer, result = run_training(args, out, resume=False, before_setup=start_afresh, after_setup=mark)
    if not result.finished:
        return 1
    first, last = result.val_losses[0][1], result.val_losses[-1][1]
    if last >= result.unigram_baseline:
        print(f"WARNING: validation loss {last:.3f} is not below the unigram baseline {result.unigram_baseline:.3f}: "
              f"train longer (--steps)")
    per_source = ", ".join(f"{k.removeprefix('val_loss_')} {v:.3f}" for k, v in result.last_val.items() if k != "val_loss")
    print(f"val loss {first:.3f} -> {last:.3f} ({per_source}); unigram baseline {result.unigram_baseline:.3f} "
          f"({result.unigram_baseline - last:.3f} nats below it)")
    tok, model = trainer.tokenizer, trainer.model.eval()
    for prompt in DEMO_PROMPTS:
        ids = torch.tensor([tok.encode(prompt, add_bos=True)])
        gen = generate(model, ids, 120, SamplingParams(temperature=0.8, top_k=50), tok.eos_id, seed=args.seed)
        print(f"\n--- sample: {prompt!r} ---\n{tok.decode(gen[0, 1:].tolist())}")
    print(f"\nmodel directory: {out}  (try: moegpt generate --model {out} --prompt 'JULIET:')")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moegpt", description="GPT-4-style sparse MoE: train, generate, inspect")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (one process, or every rank under torchrun)")
    _add_train_args(p)
    _add_parallel_args(p)
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs, final model)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("generate", help="generate text from a model directory")
    p.add_argument("--model", required=True, help="model directory (HF Mixtral format)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="1.0: no top-p")
    p.add_argument("--top-k", type=int, default=None, help="default (or -1, as vLLM): no top-k")
    p.add_argument("--min-p", type=float, default=0.0, help="0.0: no min-p")
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable); the text ends before it")
    p.add_argument("--n", type=int, default=1, help="completions of the prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--draft", default=None, help="draft model directory for speculative decoding (same tokenizer)")
    p.add_argument("--ngram", action="store_true", help="speculative decoding by prompt lookup (no draft model)")
    p.add_argument("--speculative-tokens", type=int, default=4, help="draft tokens per step (default 4)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameter and FLOP counts of a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--context", type=int, default=8192, help="context for the attention FLOPs (default 8192)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    from moegpt.planner.cli import add_plan_parser

    add_plan_parser(sub)

    from moegpt.serve.cli import add_serve_parser

    add_serve_parser(sub)

    p = sub.add_parser("demo", help="train tiny on the bundled corpus, save it, print samples")
    _add_train_args(p)
    p.add_argument("--out", default="runs/demo")
    # The demo ramps its batch from 8 to 16 sequences over the first 256K tokens, as the article's
    # recipe ramps to its full batch.
    p.set_defaults(func=cmd_demo, micro_batch=8, batch_start=8, ramp_tokens=262_144)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as e:
        parser.exit(2, f"moegpt: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
