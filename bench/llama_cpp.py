"""moegpt against llama.cpp on the same weights, in the same run: ``small`` (random weights) exported
with ``moegpt export`` to GGUF and run by llama.cpp (through llama-cpp-python, 2 threads), decoding
at batch 1 beside moegpt's engine, the two taking turns, each timing paired with the machine's read
bandwidth (a 1 GiB sum before and after it, as bench/decode_paired.py does), and the two models'
logits compared.

Rows (decode, and the prefill of a 512-token prompt): moegpt fp32 / llama.cpp F32; moegpt bf16 /
llama.cpp BF16 and F16 (the same bytes); moegpt int8 (per channel) / llama.cpp Q8_0 (blocks of 32);
moegpt int4 (groups of 32, fp32 scales) / Q4_0 (blocks of 32, fp16 scales). Decode: a prompt of 128
tokens, then ``--steps`` greedy tokens one at a time; the bytes a token reads are the shared
weights, the top-k experts of every layer and the KV cache (llama.cpp in its own formats: Q8_0 is 34
bytes per 32 weights, Q4_0 18). Parity: the F32 file's logits over a 64-token prompt against
moegpt's, and 32 greedy tokens from each.

Needs llama-cpp-python (``make bench-llama-cpp`` installs it: it builds llama.cpp, ~15 min on 2 cores);
without it the bench says so and writes nothing.

    python -m bench.llama_cpp [--repeats 5] [--steps 64]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import interleaved_medians, prefilled_engine, write_result
from bench.decode_paired import SUM_BYTES, step_bytes, sum_bandwidth, weight_bytes
from moegpt.checkpoint.gguf import export_gguf
from moegpt.checkpoint.model_dir import save
from moegpt.config import preset
from moegpt.counts import kv_cache_bytes_per_token, param_counts
from moegpt.data.sources import shakespeare_source
from moegpt.data.tokenizer import Tokenizer
from moegpt.model import build_model
from moegpt.quant.model import quantize_model
from moegpt.quant.scheme import parse_scheme

PROMPT = 128
PREFILL = 512
GGUF_BYTES_PER_WEIGHT = {"f32": 4.0, "bf16": 2.0, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
PAIRS = [("fp32", "none", "f32"), ("bf16", "none", "bf16"), ("bf16", "none", "f16"), ("fp32", "int8", "q8_0"),
         ("fp32", "int4", "q4_0")]


def paired(runs, big: torch.Tensor, repeats: int, tokens: int) -> list[dict]:
    """Each of ``runs`` decodes ``tokens`` tokens and returns the bytes they read; the runs take turns
    (a, b, a, b, ...: the machine's bandwidth level hits both alike), each repetition between two sums
    over ``big`` (one whose sums differ by more than 15% is dropped)."""
    reps = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, reps):
            before = sum_bandwidth(big)
            t0 = time.perf_counter()
            nbytes = run()
            t = time.perf_counter() - t0
            after = sum_bandwidth(big)
            out.append({"tokens_per_s": tokens / t, "fraction": nbytes / t / ((before + after) / 2),
                        "sum_gb_s": (before + after) / 2e9, "kept": abs(before - after) <= 0.15 * max(before, after)})
    results = []
    for rs in reps:
        kept = [r for r in rs if r["kept"]] or rs
        results.append({"tokens_per_s_median": statistics.median(r["tokens_per_s"] for r in kept),
                        "fraction_median": statistics.median(r["fraction"] for r in kept),
                        "fraction_best": max(r["fraction"] for r in kept),
                        "sum_gb_s_median": statistics.median(r["sum_gb_s"] for r in kept), "kept": len(kept),
                        "repetitions": rs})
    return results


def gguf_bytes_per_token(cfg, kind: str, context: int) -> float:
    """Bytes a batch-1 token reads from the GGUF model: the matrices in ``kind`` but the embedding
    table (norms and routers in f32, counted alike: they are small), one embedding row, the top-k
    experts of every layer, and the f16 KV cache at ``context``."""
    c = param_counts(cfg)
    w = GGUF_BYTES_PER_WEIGHT[kind]
    per_expert = c.experts_total / (cfg.n_layers * cfg.n_experts)
    shared = c.shared - cfg.vocab_size * cfg.d_model + cfg.d_model  # the head is untied: in c.shared
    return (shared + cfg.n_layers * cfg.top_k * per_expert) * w + context * kv_cache_bytes_per_token(cfg, 2)


def ours(dtype_name: str, model, repeats: int, steps: int):
    """moegpt's engine, one sequence with its prompt prefilled -> run(): ``steps`` decode steps."""
    engine, _ = prefilled_engine(model, 1, PROMPT, (repeats + 2) * steps + 2, seed=0, kv_cache_bytes=256 * 2**20)
    itemsize = 4 if dtype_name == "fp32" else 2
    kv, weights = kv_cache_bytes_per_token(model.cfg, itemsize), weight_bytes(model)

    def run() -> int:
        nbytes = 0
        for _ in range(steps):
            engine.step()
            nbytes += step_bytes(model.cfg, weights, engine, itemsize, kv)
        return nbytes

    run()  # warm-up
    return run


def theirs(Llama, path: Path, kind: str, cfg, repeats: int, steps: int):
    """llama.cpp with the same prompt evaluated -> run(): ``steps`` greedy tokens one at a time."""
    llm = Llama(model_path=str(path), n_ctx=PROMPT + (repeats + 2) * steps + 8, n_threads=2, n_threads_batch=2,
                n_batch=PROMPT, verbose=False)
    llm.eval(torch.randint(0, cfg.vocab_size, (PROMPT,), generator=torch.Generator().manual_seed(0)).tolist())

    def last_logits() -> np.ndarray:  # (V,): the logits of the last token evaluated (a view)
        return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(cfg.vocab_size,))

    def run() -> float:
        start = llm.n_tokens
        for _ in range(steps):
            llm.eval([int(np.argmax(last_logits()))])
        return sum(gguf_bytes_per_token(cfg, kind, n) for n in range(start, start + steps))

    run()  # warm-up
    return llm, run


def prefill_rates(Llama, path: Path, model, repeats: int) -> tuple[float, float]:
    """Prefill tokens/s of a PREFILL-token prompt: (moegpt's engine, no prefix cache; llama.cpp in one
    batch), taking turns, medians."""
    from moegpt.infer.engine import EngineConfig, LLMEngine
    from moegpt.infer.sampling_params import SamplingParams

    prompt = torch.randint(0, model.cfg.vocab_size, (PREFILL,), generator=torch.Generator().manual_seed(2)).tolist()
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=256 * 2**20, prefix_caching=False))
    llm = Llama(model_path=str(path), n_ctx=PREFILL + 16, n_threads=2, n_threads_batch=2, n_batch=PREFILL,
                n_ubatch=PREFILL, verbose=False)

    def ours_once():
        engine.generate([prompt], SamplingParams(max_tokens=1, temperature=0))

    def theirs_once():
        llm.reset()
        llm.eval(prompt)

    t_ours, t_theirs = interleaved_medians([ours_once, theirs_once], repeats)
    return PREFILL / t_ours, PREFILL / t_theirs


@torch.no_grad()
def parity(Llama, path: Path, model) -> dict:
    """The F32 file's logits and greedy tokens against moegpt's on the same prompt."""
    cfg = model.cfg
    prompt = torch.randint(0, cfg.vocab_size, (64,), generator=torch.Generator().manual_seed(1)).tolist()
    llm = Llama(model_path=str(path), n_ctx=256, n_threads=2, n_batch=64, logits_all=True, verbose=False)
    llm.eval(prompt)
    theirs_logits = torch.from_numpy(np.array(llm.scores[:len(prompt)]))
    want = model(torch.tensor([prompt])).logits[0]
    tokens_theirs = [int(np.argmax(llm.scores[len(prompt) - 1]))]
    for _ in range(31):
        llm.eval([tokens_theirs[-1]])
        tokens_theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
    from moegpt.infer.generate import generate
    from moegpt.infer.sampling_params import SamplingParams

    tokens_ours = generate(model, torch.tensor([prompt]), 32, SamplingParams(temperature=0.0), None)[0, 64:].tolist()
    return {"max_logit_diff": float((theirs_logits - want).abs().max()), "logit_scale": float(want.abs().max()),
            "same_greedy_tokens": tokens_ours == tokens_theirs}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=64)
    args = p.parse_args()
    try:
        from llama_cpp import Llama
    except ImportError:
        print("bench.llama_cpp: llama-cpp-python is not installed (make bench-llama-cpp installs it: it builds "
              "llama.cpp, ~15 min on 2 cores): skipped")
        return
    torch.set_num_threads(2)
    cfg = preset("small")
    big = torch.ones(SUM_BYTES // 4)
    rows = []
    with tempfile.TemporaryDirectory() as d:
        tok = Tokenizer.train([shakespeare_source().paths[0].read_text(encoding="utf-8")], cfg.vocab_size)
        model = build_model(cfg, seed=0).eval()
        save(model, tok, Path(d) / "fp32")
        export_gguf(Path(d) / "fp32", Path(d) / "f32.gguf", "f32")
        check = parity(Llama, Path(d) / "f32.gguf", model)
        del model
        print(f"parity (F32 file vs moegpt fp32): max logit difference {check['max_logit_diff']:.2e} "
              f"(logits up to {check['logit_scale']:.1f}), same 32 greedy tokens: {check['same_greedy_tokens']}")
        for dtype_name, scheme, kind in PAIRS:
            m = build_model(cfg, seed=0, dtype=torch.float32 if dtype_name == "fp32" else torch.bfloat16).eval()
            if scheme != "none":
                quantize_model(m, parse_scheme(scheme, 32 if scheme == "int4" else None))
            if kind != "f32":
                export_gguf(Path(d) / "fp32", Path(d) / f"{kind}.gguf", kind)
            llm, run_theirs = theirs(Llama, Path(d) / f"{kind}.gguf", kind, cfg, args.repeats, args.steps)
            a, b = paired([ours(dtype_name, m, args.repeats, args.steps), run_theirs], big, args.repeats, args.steps)
            del llm
            pre_ours, pre_theirs = prefill_rates(Llama, Path(d) / f"{kind}.gguf", m, 3)
            del m
            a = {"engine": "moegpt", "dtype": dtype_name, "weights": scheme, "prefill_tokens_per_s": pre_ours, **a}
            b = {"engine": "llama.cpp", "gguf": kind, "prefill_tokens_per_s": pre_theirs, **b}
            rows += [a, b]
            print(f"batch 1  moegpt {dtype_name}{'' if scheme == 'none' else ' ' + scheme:>10}: "
                  f"{a['tokens_per_s_median']:6.1f} tok/s, {a['fraction_median']:.2f} of the paired sum (best "
                  f"{a['fraction_best']:.2f}, sum {a['sum_gb_s_median']:.1f} GB/s)   llama.cpp {kind.upper():>5}: "
                  f"{b['tokens_per_s_median']:6.1f} tok/s, {b['fraction_median']:.2f} (best {b['fraction_best']:.2f}, "
                  f"sum {b['sum_gb_s_median']:.1f} GB/s)   ratio {a['tokens_per_s_median'] / b['tokens_per_s_median']:.2f}x\n"
                  f"prefill {PREFILL}: moegpt {pre_ours:6.0f} tok/s   llama.cpp {pre_theirs:6.0f} tok/s   ratio "
                  f"{pre_ours / pre_theirs:.2f}x", flush=True)
    print("wrote", write_result("llama_cpp", {"preset": "small", "prompt": PROMPT, "steps": args.steps,
                                              "parity": check, "rows": rows}))


if __name__ == "__main__":
    main()
