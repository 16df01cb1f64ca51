"""The ``moegpt`` command: train | finetune | train-vision | generate | quantize | serve | info | plan | demo.

Every subcommand validates its inputs before doing any work and reports bad input as one line,
``moegpt: error: ...``, with exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path


def cmd_generate(args) -> int:
    from moegpt.infer.engine import EngineConfig
    from moegpt.infer.speculative import speculative_from_flags
    from moegpt.infer.llm import LLM
    from moegpt.infer.sampling_params import SamplingParams

    params = SamplingParams(n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            min_p=args.min_p, seed=args.seed, stop=list(args.stop), max_tokens=args.max_tokens,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            repetition_penalty=args.repetition_penalty)
    spec = speculative_from_flags(bool(args.draft), args.ngram, args.speculative_tokens)
    config = EngineConfig(speculative=spec, kv_cache_dtype=args.kv_cache_dtype)
    from moegpt.infer.sharded import ShardFailure, start_from_args

    world = start_from_args(args)
    if world is None:
        return _generate(args, LLM(args.model, config, draft_model=args.draft), params, spec)
    try:
        if not world.is_driver:  # a shard: rank 0's steps until it is done
            world.follow(config)
        else:
            _generate(args, LLM(args.model, config, draft_model=args.draft, shards=world), params, spec)
            world.stop()
    except ShardFailure as e:
        print(f"moegpt: error: {e}", file=sys.stderr)
        return 1
    world.close()
    return 0


def _generate(args, llm, params, spec) -> int:
    tok, engine = llm.tokenizer, llm.engine
    shown, pixels = args.prompt, []
    if args.image:
        ids, pixels, params = image_request(llm, args.image, args.prompt, params)
        shown = ""  # a chat answer: the reply alone
    else:
        ids = tok.encode(args.prompt, add_special_tokens=True)
    texts: dict[int, list[str]] = {i: [] for i in range(args.n)}
    for update in engine.stream(ids, params, pixels):
        if args.n == 1:  # one completion: stream it as it comes
            if not texts[0]:
                sys.stdout.write(shown)
            sys.stdout.write(update.text)
            sys.stdout.flush()
        texts[update.index].append(update.text)
    if args.n == 1:
        sys.stdout.write("\n")
    else:
        for i in range(args.n):
            print(f"--- completion {i}\n{shown}{''.join(texts[i])}")
    stats = engine.stats
    if spec is not None:
        rate = f"{stats.spec_acceptance_rate:.2f}" if stats.spec_proposed else "-"
        print(f"speculative: {stats.spec_accepted}/{stats.spec_proposed} draft tokens accepted ({rate}), "
              f"{stats.generation_tokens / max(stats.steps, 1):.2f} tokens per target pass", file=sys.stderr)
    return 0


def image_request(llm, paths: list[str], prompt: str, params):
    """``moegpt generate --image``: the prompt as a chat user turn with the pictures first, rendered
    as the server renders image content parts -> (token ids, pixel values, params stopping at the
    end of the assistant's turn)."""
    import dataclasses

    from moegpt.data.chat import chat_format
    from moegpt.data.images import decode_image, preprocess
    from moegpt.data.vision_data import image_marker

    if llm.image_processing is None:
        raise ValueError("--image: the model has no vision part: it takes no images")
    fmt = chat_format(llm.tokenizer)
    if fmt is None:
        raise ValueError("--image: the model has no chat template to put the pictures in")
    images = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as e:
            raise ValueError(f"--image {path}: {e.strerror}") from None
        images.append(decode_image(data, what=f"--image {path}"))
    text = fmt.render([{"role": "user", "content": image_marker() * len(images) + prompt}], add_generation_prompt=True)
    params = dataclasses.replace(params, stop_token_ids=tuple(sorted(set(params.stop_token_ids) | fmt.stop_token_ids)))
    return llm.tokenizer.encode(text), list(preprocess(images, llm.image_processing)), params


def cmd_info(args) -> int:
    from moegpt.config import preset
    from moegpt.counts import forward_flops_per_token, kv_cache_bytes_per_token, param_counts

    cfg = preset(args.preset)
    c = param_counts(cfg)
    vision = _vision_info(cfg, args) if args.vision else None
    info = {
        "preset": args.preset,
        "config": cfg.to_dict(),
        "params": c.to_dict(),
        "forward_flops_per_token": forward_flops_per_token(cfg),
        "forward_flops_per_token_at_context": forward_flops_per_token(cfg, args.context),
        "context": args.context,
        "kv_cache_bytes_per_token_fp16": kv_cache_bytes_per_token(cfg, 2),
    }
    if vision is not None:
        info["vision"] = vision
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
    if vision is not None:
        p = vision["params"]
        rows += [(f"vision tower ({args.vision})", n(p["tower"])), ("resampler", n(p["resampler"])),
                 (f"gated cross-attention (x{len(vision['cross_attention_layers'])})", n(p["cross_attention"])),
                 ("vision adds", n(p["added"])), ("image encode FLOPs/image", n(vision["image_flops"])),
                 ("cross-attention FLOPs/token", n(vision["cross_attention_flops_per_token"]))]
    for label, value in rows:
        print(f"  {label:<34} {value:>10}")
    return 0


def _vision_info(cfg, args) -> dict:
    from moegpt.counts import cross_attention_flops_per_token, image_flops, vision_param_counts
    from moegpt.vision_config import VisionConfig, tower_preset

    vcfg = VisionConfig.for_text(cfg, tower_preset(args.vision), cross_attention_every=args.cross_attention_every)
    return {"config": vcfg.to_dict(), "params": vision_param_counts(vcfg).to_dict(),
            "cross_attention_layers": list(vcfg.cross_attention_layers), "image_flops": image_flops(vcfg),
            "cross_attention_flops_per_token": cross_attention_flops_per_token(vcfg)}


def engine_decode_measurers(pool_bytes: int | None = None, steps: int | None = None):
    """The planner's ``DecodeMeasurers`` timing our engine (moegpt.infer.measure): the planner only
    does arithmetic, and the CLI, which may import both, joins them."""
    import torch

    from moegpt.infer import measure
    from moegpt.planner.local_decode import DTYPE_NAMES, DecodeMeasurers

    pool = measure.POOL_BYTES if pool_bytes is None else pool_bytes
    n = measure.STEPS if steps is None else steps

    def dtype(weight_bytes: int) -> torch.dtype:
        return getattr(torch, DTYPE_NAMES[weight_bytes])

    return DecodeMeasurers(
        matmul_s=lambda p, wb: measure.weight_product_s(p.rows, p.out_features, p.in_features, p.in_by_out,
                                                        dtype(wb), pool_bytes=pool),
        step_s=lambda cfg, b, c, wb: measure.decode_step_s(cfg, b, c, dtype(wb), steps=n))


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
        out.mkdir(parents=True, exist_ok=True)  # empty, or made here (an interrupted run leaves it empty)

    def mark():
        marker.write_text("made by 'moegpt demo', which replaces this directory on each run\n")

    from moegpt.train.cli import run_training

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
        ids = tok.encode(prompt, add_special_tokens=True)  # as moegpt generate and the server encode it
        new = min(120, model.cfg.max_seq_len - len(ids))  # a model of a short context samples up to it
        gen = generate(model, torch.tensor([ids]), new, SamplingParams(temperature=0.8, top_k=50), tok.eos_id,
                       seed=args.seed)
        print(f"\n--- sample: {prompt!r} ---\n{prompt}{tok.decode(gen[0, len(ids):].tolist())}")
    print(f"\nmodel directory: {out}  (try: moegpt generate --model {out} --prompt 'JULIET:')")
    return 0


def read_chat_template(path: str | None) -> str | None:
    """--chat-template FILE's text (None when not given)."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise ValueError(f"--chat-template {path} does not exist")
    return Path(path).read_text(encoding="utf-8")


def check_reference(directory: Path, ft, context: str | None) -> None:
    """--reference DIR: a model of the base's shape and context (one-line errors before training starts)."""
    import dataclasses

    from moegpt.checkpoint.model_dir import read_directory

    if context is None:
        raise ValueError("--reference compares text perplexity after a context extension: give --context too")
    if not (directory / "config.json").is_file():
        raise ValueError(f"--reference {directory} is not a model directory (no config.json)")
    cfg = read_directory(directory)[0]
    base = ft.model_cfg.replace(max_seq_len=ft.model_cfg.rope_scaling.original_max_seq_len, rope_scaling=None)
    for field in dataclasses.fields(base):
        if (theirs := getattr(cfg, field.name)) != (ours := getattr(base, field.name)):
            raise ValueError(f"--reference {directory} has {field.name} {theirs}; --model has {ours}")


def cmd_finetune(args) -> int:
    """Fine-tune --model on --data's conversations; exact match of greedy answers on the held-out
    conversations before (the base model) and after, printed and written to OUT/finetune_eval.json."""
    from moegpt.atomic import write_text_atomic
    from moegpt.checkpoint.model_dir import load
    from moegpt.infer.chat_eval import exact_match
    from moegpt.train.cli import CONTEXT_DEFAULTS, FINETUNE_DATA, apply_finetune_defaults, run_training
    from moegpt.train.finetune import finetune_inputs

    if args.eval_max < 0 or args.passkey_per_cell < 1:
        raise ValueError(f"--eval-max {args.eval_max} must be >= 0 and --passkey-per-cell {args.passkey_per_cell} >= 1")
    template = read_chat_template(args.chat_template)
    data = args.data or (CONTEXT_DEFAULTS["data"] if args.context else FINETUNE_DATA)
    ft = finetune_inputs(args.model, data, chat_template=template, packing=not args.no_packing,
                         drop_long=args.long == "drop", context=args.context, rope_type=args.rope_scaling)
    apply_finetune_defaults(args, ft.model_cfg.max_seq_len if args.context else None)
    if args.reference is not None:
        check_reference(Path(args.reference), ft, args.context)
    out = Path(args.out)

    def evaluate(directory: Path, trainer) -> dict:
        model, tok = load(directory)
        scores = {}
        for source in trainer.data.sources:
            if not hasattr(source, "val_tasks"):  # plain text: its held-out loss is in the log
                continue
            # each held-out conversation up to its last assistant message (the reference answer)
            convs = [c[:max(i for i, m in enumerate(c) if m["role"] == "assistant") + 1] for c in source.val[:args.eval_max]]
            tasks = (source.val_tasks or (None,) * len(source.val))[:args.eval_max]
            scores[source.name] = exact_match(model, tok, ft.chat, convs, tasks)
        return scores

    trainer, result = run_training(args, out, args.resume, finetune=ft)
    if args.no_eval or not result.finished or not trainer.runtime.is_main:
        return 0
    if args.context:
        from moegpt.infer.context_eval import context_evaluation
        from moegpt.train.trainer import default_cache_dir

        context_evaluation(Path(args.model), out, ft, trainer, args.passkey_per_cell,
                           Path(args.cache_dir) if args.cache_dir else default_cache_dir(),
                           reference_dir=Path(args.reference) if args.reference else None)
        return 0
    report = {"base": evaluate(Path(args.model), trainer), "tuned": evaluate(out, trainer)}
    write_text_atomic(out / "finetune_eval.json", json.dumps(report, indent=2) + "\n")
    print("\nexact match of greedy answers on held-out conversations (base -> tuned):")
    for name, tuned in report["tuned"].items():
        for task, row in tuned.items():
            base = report["base"][name][task]
            print(f"  {name:14s} {task:14s} {base['exact_match']:6.1%} -> {row['exact_match']:6.1%}  (n={row['n']})")
    print(f"tuned model directory: {out}  (try: moegpt serve --model {out})")
    return 0


def cmd_export(args) -> int:
    """Write --model as the GGUF file --gguf (llama.cpp's llama architecture with experts)."""
    from moegpt.checkpoint.gguf import export_gguf

    size = export_gguf(args.model, args.gguf, args.type)
    print(f"wrote {args.gguf} ({size / 1e6:.1f} MB, matrices {args.type})  (try: llama-cli -m {args.gguf})")
    return 0


def cmd_quantize(args) -> int:
    """Quantize --model into --out, refused (exit 2, nothing written) past the quality gates."""
    from moegpt.infer.quantize import (DEFAULT_MAX_PERPLEXITY_INCREASE, DEFAULT_MIN_TOP1_AGREEMENT, Gates, describe,
                                       quantize_directory)
    from moegpt.quant.scheme import parse_scheme
    from moegpt.train.trainer import default_cache_dir

    scheme = parse_scheme(args.scheme, args.group_size)
    gates = Gates(max_perplexity_increase=(DEFAULT_MAX_PERPLEXITY_INCREASE[scheme.bits]
                                           if args.max_perplexity_increase is None else args.max_perplexity_increase / 100),
                  min_top1_agreement=(DEFAULT_MIN_TOP1_AGREEMENT[scheme.bits]
                                      if args.min_top1_agreement is None else args.min_top1_agreement),
                  eval_sequences=args.eval_sequences, seq_len=args.seq_len)
    report = quantize_directory(args.model, args.out, scheme, gates,
                                Path(args.cache_dir) if args.cache_dir else default_cache_dir(), args.quantize_embedding)
    print(describe(report))
    print(f"quantized model directory: {args.out}  (try: moegpt generate --model {args.out} --prompt ...)")
    return 0


def cmd_train_vision(args) -> int:
    """Join --model to an image side, train it on generated pictures, then report what it reads on
    held-out ones (and with the images shuffled), printed and written to OUT/vision_eval.json."""
    from moegpt.atomic import write_text_atomic
    from moegpt.checkpoint.model_dir import load
    from moegpt.parallel.checkpoint import latest
    from moegpt.parallel.process_group import restart_count
    from moegpt.train.cli import run_training
    from moegpt.train.trainer import check_fresh_out
    from moegpt.train.vision import vision_inputs
    from moegpt.train.vision_eval import vision_report

    if args.eval_max < 1:
        raise ValueError(f"--eval-max {args.eval_max} must be >= 1")
    template = read_chat_template(args.chat_template)
    vision = vision_inputs(args.model, tower=args.tower, cross_attention_every=args.cross_attention_every,
                           n_latents=args.latents, freeze_tower=args.freeze_tower, train_text=args.train_text,
                           chat_template=template)
    if args.pretrain_steps < 0 or not args.pretrain_lr > 0:
        raise ValueError(f"--pretrain-steps {args.pretrain_steps} must be >= 0 and --pretrain-lr {args.pretrain_lr} > 0")
    vision = dataclasses.replace(vision, settings={**vision.settings, "pretrain_steps": args.pretrain_steps,
                                                   "pretrain_lr": args.pretrain_lr})
    out = Path(args.out)
    restarted = restart_count() > 0  # torchrun restarted the group after a failure
    if not (args.resume or restarted):
        check_fresh_out(out)  # before minutes of pre-training, not after
    pretrained = None
    resumes = args.resume or (restarted and latest(out / "checkpoints") is not None)  # as run_training decides
    if args.pretrain_steps and not resumes:  # a resumed run's checkpoint holds the pre-trained weights
        vision, pretrained = pretrain_vision(vision, args)
    trainer, result = run_training(args, out, args.resume, finetune=vision)
    if pretrained is not None and trainer.runtime.is_main:
        write_text_atomic(out / "image_pretraining.json", json.dumps(dataclasses.asdict(pretrained), indent=2) + "\n")
    if args.no_eval or not result.finished or not trainer.runtime.is_main:
        return 0
    model = load(out)[0]
    report = vision_report(model, trainer.data, args.eval_max)
    write_text_atomic(out / "vision_eval.json", json.dumps(report, indent=2) + "\n")
    print_vision_report(report)
    print(f"vision model directory: {out}")
    return 0


def pretrain_vision(vision, args):
    """Train ``vision``'s tower and resampler on their own first (train/vision_pretrain.py), on
    --data's sources -> (vision with those weights, the report)."""
    from moegpt.data.vision_data import parse_vision_mixture
    from moegpt.train.vision_pretrain import pretrain_image_side

    model = vision.make_model(args.seed)
    quiet = int(os.environ.get("RANK", "0")) != 0
    report = pretrain_image_side(model, parse_vision_mixture(args.data), vision.processing, steps=args.pretrain_steps,
                                 batch_size=args.batch_size, lr=args.pretrain_lr, seed=args.seed,
                                 log=None if quiet else lambda line: print(line, flush=True))
    if not quiet:
        print(f"moegpt: image side pre-trained for {report.steps} steps in {report.seconds:.0f} s; held-out "
              + ", ".join(f"{k} {v:.1%}" for k, v in report.accuracy.items()), flush=True)
    weights = {part: {k: v.detach().clone() for k, v in getattr(model, part).state_dict().items()}
               for part in ("tower", "resampler")}
    return dataclasses.replace(vision, image_weights=weights), report


def print_vision_report(report: dict) -> None:
    print("\nheld-out pictures, greedy answers (with the images shuffled across the batch in brackets):")
    for name, row in report.items():
        scores = ", ".join(f"{k.removesuffix('_accuracy').replace('_', ' ')} {v:.1%} "
                           f"({row['shuffled_images'][k]:.1%})" for k, v in row["scores"].items())
        print(f"  {name} (n={row['n']}): {scores}")
        for sample in row["samples"][:3]:
            print(f"      truth {sample['truth']!r}\n      model {sample['answer']!r}")


class Parser(argparse.ArgumentParser):
    """Bad flags get one line naming the value (argparse's own message), not the whole usage."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from moegpt.serve.cli import add_layout_args

    parser = Parser(prog="moegpt", description="GPT-4-style sparse MoE: train, generate, inspect")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    from moegpt.train.cli import add_finetune_parser, add_train_args, add_train_parser, add_vision_parser

    add_train_parser(sub)
    add_finetune_parser(sub, cmd_finetune)
    add_vision_parser(sub, cmd_train_vision)

    p = sub.add_parser("generate", help="generate text from a model directory")
    p.add_argument("--model", required=True, help="model directory (HF Mixtral format)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="a PNG or JPEG picture for a vision model (repeatable): the prompt becomes a chat user turn "
                        "with the pictures first, and the reply is printed")
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
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8"], default="auto",
                   help="auto: the model's dtype; int8 / fp8 (e4m3): 8 bits per value and a scale per token and kv head")
    add_layout_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="parameter and FLOP counts of a preset")
    p.add_argument("--preset", required=True)
    p.add_argument("--context", type=int, default=8192, help="context for the attention FLOPs (default 8192)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--vision", default=None, metavar="TOWER",
                   help="also count a Flamingo-style vision part with this tower preset (tiny, clip-vit-b-16, "
                        "clip-vit-l-14, siglip-so400m-14-384)")
    p.add_argument("--cross-attention-every", type=int, default=4,
                   help="with --vision: a gated cross-attention block before every Nth layer (default 4)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("quantize", help="weight-only int8 / int4 quantization of a model directory, with quality gates")
    p.add_argument("--model", required=True, help="full-precision model directory (HF Mixtral format)")
    p.add_argument("--out", required=True, help="the quantized directory (compressed-tensors pack-quantized)")
    p.add_argument("--scheme", required=True, choices=["int8", "int4", "fp8"],
                   help="int8: one scale per output channel; int4: one per group of --group-size inputs; fp8: e4m3 "
                        "weights per channel, activations quantized per token at run time (for GPUs' fp8 matmuls)")
    p.add_argument("--group-size", type=int, choices=[32, 64, 128], default=None, help="int4 default 32")
    p.add_argument("--quantize-embedding", action="store_true",
                   help="the token embedding table too, with the same scheme (int8 / int4; untied models): a lookup "
                        "dequantizes the rows it reads. transformers and recent vLLM load it; older loaders expect "
                        "a full-precision table")
    p.add_argument("--max-perplexity-increase", type=float, default=None, metavar="PCT",
                   help="refuse past this perplexity increase on the validation split, in percent "
                        "(default 1 for int8, 5 for int4)")
    p.add_argument("--min-top1-agreement", type=float, default=None, metavar="F",
                   help="refuse below this fraction of positions whose most likely next token agrees with "
                        "the full-precision model's (default 0.95 int8, 0.85 int4)")
    p.add_argument("--eval-sequences", type=int, default=64, help="validation blocks evaluated (default 64)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per validation block (default 128)")
    p.add_argument("--cache-dir", default=None, help="tokenized-corpus cache (default as training's)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("export", help="write a model directory as one GGUF file (llama.cpp)")
    p.add_argument("--model", required=True, help="model directory (HF Mixtral format; quantized ones are dequantized)")
    p.add_argument("--gguf", required=True, metavar="FILE", help="the GGUF file to write")
    p.add_argument("--type", default="q8_0", choices=["q8_0", "q4_0", "f16", "bf16", "f32"],
                   help="the matrices' type (default q8_0; norms and routers stay f32)")
    p.set_defaults(func=cmd_export)

    from moegpt.planner.cli import add_plan_parser

    add_plan_parser(sub, decode_measurers=engine_decode_measurers)

    from moegpt.serve.cli import add_serve_parser

    add_serve_parser(sub)

    p = sub.add_parser("demo", help="train tiny on the bundled corpus, save it, print samples")
    add_train_args(p)
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
