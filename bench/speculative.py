"""Speculative decoding at batch 1 with a trained target: plain engine vs draft-model and n-gram
(prompt lookup) speculation, tokens/s, speedup, acceptance rate and tokens per target pass.

The target is the demo's model (``runs/demo`` when it exists, else a demo run trained into the
cache). The draft is a one-layer model distilled from it: trained on the bundled corpus to match the
target's next-token distributions (KL to the target's softmax), with the target's tokenizer.
Both are cached, so later runs only measure.

Beside each measured speedup, its weight-byte bound: an MoE target's verification pass over k+1
tokens reads every expert those tokens chose (up to (k+1)*top_k per layer, against top_k for one
token), so the target's weight bytes per generated token, counted from the experts each pass
actually hit, bound the speedup from above (the draft's own passes cost extra):
bound = plain bytes per token / speculative bytes per token.

    python -m bench.speculative [--new-tokens 128] [--repeats 3]
"""

from __future__ import annotations

import argparse
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.common import interleaved_medians, write_result
from moegpt.checkpoint.model_dir import load, save
from moegpt.counts import param_counts
from moegpt.data.sources import iter_documents, shakespeare_source, stdlib_code_source
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.speculative import SpeculativeConfig, SpeculativeMethod
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import build_model
from moegpt.train.trainer import default_cache_dir

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ("ROMEO:\n", "KING HENRY:\nWhat says", "def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n")


def target_dir() -> Path:
    demo = ROOT / "runs" / "demo"
    if (demo / "config.json").exists():
        return demo
    cached = default_cache_dir() / "bench" / "spec-target"
    if not (cached / "config.json").exists():  # train it with the demo's recipe (resuming an interrupted run)
        from moegpt.cli import build_parser
        from moegpt.train.cli import run_training

        print(f"training the target (the demo's recipe) into {cached} ...", flush=True)
        args = build_parser().parse_args(["demo", "--out", str(cached), "--no-progress"])
        resume = (cached / "checkpoints").exists()
        if not resume and cached.exists():
            shutil.rmtree(cached)  # a run that never checkpointed: start again
        run_training(args, cached, resume=resume)
    return cached


def corpus_batches(tok, seq_len: int, batch: int, seed: int = 0):
    """Endless (batch, seq_len) token batches from the bundled text and code corpora."""
    docs = [d for s in (shakespeare_source(), stdlib_code_source(max_bytes=2_000_000)) for d in iter_documents(s)]
    ids = [t for d in docs for t in tok.encode(d) + [tok.eos_id]]
    data = torch.tensor(ids)
    rng = random.Random(seed)
    while True:
        starts = [rng.randrange(0, len(data) - seq_len - 1) for _ in range(batch)]
        yield torch.stack([data[s:s + seq_len] for s in starts])


def distill_draft(target_path: Path, steps: int = 400) -> Path:
    target, tok = load(target_path)
    out = default_cache_dir() / "bench" / f"spec-draft-{tok.fingerprint}-{steps}"
    if (out / "config.json").exists():
        return out
    print(f"distilling a one-layer draft from {target_path} into {out} ...", flush=True)
    cfg = target.cfg.replace(n_layers=1, n_experts=4)
    draft = build_model(cfg, seed=0).train()
    target.eval()
    opt = torch.optim.AdamW(draft.parameters(), lr=3e-3, weight_decay=0.0)
    batches = corpus_batches(tok, 128, 16)
    t0 = time.perf_counter()
    for step in range(steps):
        x = next(batches)
        with torch.no_grad():
            teacher = F.log_softmax(target(x).logits.float(), -1)  # (B, T, V)
        out_d = draft(x)
        student = F.log_softmax(out_d.logits.float(), -1)
        loss = F.kl_div(student, teacher, log_target=True, reduction="batchmean") / x.shape[1] + 0.01 * out_d.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = 3e-3 * min(1.0, (steps - step) / (0.3 * steps))  # linear decay over the last 30%
        if step % 100 == 0:
            print(f"  step {step}: KL {loss.item():.3f} ({time.perf_counter() - t0:.0f}s)", flush=True)
    save(draft.eval(), tok, out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--k", type=int, default=4)
    args = ap.parse_args()

    tpath = target_dir()
    dpath = distill_draft(tpath)
    target, tok = load(tpath)
    draft, _ = load(dpath)
    prompts = [tok.encode(p, add_bos=True) for p in PROMPTS]
    engines = {
        "plain": LLMEngine(target, EngineConfig(), tok),
        "draft": LLMEngine(target, EngineConfig(speculative=SpeculativeConfig(num_tokens=args.k)), tok, draft=draft),
        "ngram": LLMEngine(target, EngineConfig(speculative=SpeculativeConfig(method=SpeculativeMethod.NGRAM, num_tokens=args.k)), tok),
    }
    c = param_counts(target.cfg)
    embed = 0 if target.lm_head is None else target.cfg.vocab_size * target.cfg.d_model  # looked up, not read
    shared, expert = c.shared - embed, c.per_expert // max(1, target.cfg.n_moe_layers)  # elements; one expert, one layer
    weight_elements = {name: 0 for name in engines}  # the target's weights read, summed over passes

    def counting(name, run):
        def wrapped(chunks):
            out = run(chunks)
            hit = int((out.expert_counts > 0).sum()) if out.expert_counts is not None else 0
            weight_elements[name] += shared + hit * expert
            return out
        return wrapped

    for name, engine in engines.items():
        engine.runner.run = counting(name, engine.runner.run)
    rows = []
    for mode, sampling in (("greedy", dict(temperature=0.0)), ("T=0.8", dict(temperature=0.8, top_k=50))):
        req = SamplingParams(max_tokens=args.new_tokens, seed=0, ignore_eos=True, **sampling)
        outputs: dict[str, list] = {}

        def runner(name):
            def run():  # batch 1: one prompt at a time
                engine = engines[name]
                outputs[name] = [engine.generate([p], req)[0].outputs[0].token_ids for p in prompts]
            return run

        before = {n: (e.stats.spec_proposed, e.stats.spec_accepted, e.stats.steps, e.stats.generation_tokens,
                      weight_elements[n]) for n, e in engines.items()}
        times = dict(zip(engines, interleaved_medians([runner(n) for n in engines], args.repeats)))
        if mode == "greedy":
            assert outputs["draft"] == outputs["plain"] == outputs["ngram"], "greedy speculative output differs"
        n_tokens = len(prompts) * args.new_tokens
        per_token = {n: (weight_elements[n] - before[n][4]) / (e.stats.generation_tokens - before[n][3])
                     for n, e in engines.items()}
        for name, engine in engines.items():
            p0, a0, s0, g0, _ = before[name]
            s = engine.stats
            proposed, accepted = s.spec_proposed - p0, s.spec_accepted - a0
            rows.append({
                "mode": mode, "method": name, "tokens_per_s": n_tokens / times[name],
                "speedup": times["plain"] / times[name],
                "acceptance_rate": accepted / proposed if proposed else None,
                "tokens_per_target_pass": (s.generation_tokens - g0) / (s.steps - s0),
                "target_weight_bytes_per_token": per_token[name] * target.embed.weight.element_size(),
                "speedup_bound_by_weight_bytes": per_token["plain"] / per_token[name],
            })
    print(f"\nspeculative decoding, batch 1, {len(prompts)} prompts x {args.new_tokens} new tokens, k={args.k}; "
          f"target {tpath.name}, draft {dpath.name} (1 layer, distilled)")
    print(f"{'mode':8} {'method':6} {'tokens/s':>9} {'speedup':>8} {'accept':>7} {'tok/pass':>9} "
          f"{'MB/token':>9} {'bound':>7}")
    for r in rows:
        acc = f"{r['acceptance_rate']:.2f}" if r["acceptance_rate"] is not None else "-"
        print(f"{r['mode']:8} {r['method']:6} {r['tokens_per_s']:9.1f} {r['speedup']:7.2f}x {acc:>7} "
              f"{r['tokens_per_target_pass']:9.2f} {r['target_weight_bytes_per_token'] / 1e6:9.2f} "
              f"{r['speedup_bound_by_weight_bytes']:6.2f}x")
    path = write_result("speculative", {"k": args.k, "new_tokens": args.new_tokens, "prompts": list(PROMPTS),
                                        "target": tpath.name, "draft": dpath.name, "rows": rows})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
