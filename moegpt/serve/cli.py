"""``moegpt serve``'s command line: ``add_serve_parser(subparsers)`` adds it, ``cmd_serve(args)`` runs it.
Light to import (the server's dependencies load only when it runs); bad input is a one-line
ValueError (the main CLI prints it, exit 2)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def add_layout_args(p) -> None:
    """The serving layout flags of ``generate`` and ``serve`` (run under torchrun with as many processes)."""
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks (attention heads, expert FFN split)")
    p.add_argument("--pp", type=int, default=1, help="pipeline stages (layers split)")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel ranks (experts divided, all-to-all)")
    p.add_argument("--first-stage-layers", type=int, default=None,
                   help="layers of the first pipeline stage, which also holds the embedding (default: an even split)")
    p.add_argument("--dist-timeout", type=float, default=120.0,
                   help="seconds a collective may wait before the run fails (default 120)")


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("serve", help="an OpenAI-compatible HTTP server for a model directory")
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (HF Mixtral format + tokenizer)")
    p.add_argument("--draft", default=None, metavar="DIR", help="draft model for speculative decoding")
    p.add_argument("--ngram", action="store_true", help="speculative decoding by prompt lookup (no draft model)")
    p.add_argument("--speculative-tokens", type=int, default=4, help="draft tokens per step (default 4)")
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the directory's)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="sequences waiting in the engine before new requests get 429")
    p.add_argument("--max-queued-tokens", type=int, default=1 << 18,
                   help="prompt tokens waiting in the engine before new requests get 429")
    p.add_argument("--kv-cache-bytes", type=int, default=256 * 2**20, help="KV cache budget (default 256 MiB)")
    p.add_argument("--num-kv-blocks", type=int, default=None, help="or the KV cache budget in blocks")
    p.add_argument("--kv-cache-dtype", choices=["auto", "int8", "fp8"], default="auto",
                   help="auto: the model's dtype; int8 / fp8 (e4m3): 8 bits per value and a scale per token and kv head")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences per engine step")
    p.add_argument("--max-batched-tokens", type=int, default=512, help="tokens per engine step")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds in-flight requests may run after SIGTERM")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $MOEGPT_API_KEY; unset: open)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template for /v1/chat/completions (default: the tokenizer's)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 2**20,
                   help="larger request bodies get 413 (default 4 MiB)")
    p.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    add_layout_args(p)
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(args) -> int:
    from moegpt.infer.engine import EngineConfig
    from moegpt.infer.speculative import speculative_from_flags
    from moegpt.infer.scheduler import SchedulerConfig
    from moegpt.serve.engine_loop import Limits

    try:
        from moegpt.serve.server import ServerOptions, serve
    except ImportError as e:
        raise ValueError(f"moegpt serve needs the serve extra (pip install 'moegpt[serve]'): {e}") from None

    if not 0 <= args.port < 65536:
        raise ValueError(f"--port={args.port} must be in [0, 65535]")
    if args.shutdown_timeout < 0:
        raise ValueError(f"--shutdown-timeout={args.shutdown_timeout} must be >= 0")
    if args.max_request_bytes < 1:
        raise ValueError(f"--max-request-bytes={args.max_request_bytes} must be >= 1")
    source = "--api-key" if args.api_key is not None else "MOEGPT_API_KEY"
    api_key = args.api_key if args.api_key is not None else os.environ.get("MOEGPT_API_KEY") or None
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise ValueError(f"{source} must not be empty or begin or end with whitespace (a bearer token never does)")
    speculative = speculative_from_flags(bool(args.draft), args.ngram, args.speculative_tokens)
    config = EngineConfig(block_size=args.block_size, kv_cache_bytes=args.kv_cache_bytes,
                          num_kv_blocks=args.num_kv_blocks,
                          scheduler=SchedulerConfig(max_num_seqs=args.max_num_seqs,
                                                    max_batched_tokens=args.max_batched_tokens),
                          prefix_caching=not args.no_prefix_caching, speculative=speculative,
                          kv_cache_dtype=args.kv_cache_dtype)
    options = ServerOptions(model_dir=args.model, draft_dir=args.draft, model_name=args.served_model_name,
                            host=args.host, port=args.port,
                            limits=Limits(max_queued_requests=args.max_queued_requests,
                                          max_queued_tokens=args.max_queued_tokens),
                            shutdown_timeout=args.shutdown_timeout, log_level=args.log_level, api_key=api_key,
                            chat_template=_read_template(args.chat_template),
                            max_request_bytes=args.max_request_bytes)
    from moegpt.infer.sharded import ShardFailure, start_from_args

    world = start_from_args(args)
    if world is None:
        return serve(options, config)
    import signal
    import sys

    try:
        if not world.is_driver:
            # torchrun signals every rank; rank 0 drains its requests, then releases the others
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            world.follow(config)
        else:
            code = serve(options, config, shards=world)
            world.stop()  # releases the other ranks (nothing to do when one failed)
            if code != 0:
                return code
    except ShardFailure as e:
        print(f"moegpt: error: {e}", file=sys.stderr, flush=True)
        return 1
    world.close()
    return 0


def _read_template(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--chat-template {path!r} cannot be read ({e.__class__.__name__}: {e})") from None
    if not text.strip():
        raise ValueError(f"--chat-template {path!r} is empty")
    return text
