"""Decode and prefill at batch 1 on ``small`` (random weights): LLMEngine vs transformers' generate on
the same model directory, and vs this machine's rooflines measured in the same run.

For each dtype (fp32, bf16): greedy, a 128-token prompt, 128 new tokens. Each side is timed
generating 1 token (prefill + one sample) and 128 tokens, interleaved (ours, HF, ours, HF, ...);
decode tokens/s = 127 / (t_128 - t_1), prefill tokens/s = 128 / t_1. Both must produce the same
tokens (same weights, greedy; checked in fp32, reported in bf16 where rounding may differ).
The decode roofline divides the read bandwidth (a sum over a 1 GiB array, best of several; see
bench/decode_paired.py for fractions paired with each timing) by the bytes one token reads: attention, router, 2 of 16 experts per layer, one embedding
row, the LM head, norms, and the KV of the mean context (prompt + new/2). The prefill roofline is the
fp32 matmul peak (bf16 matmuls run on fp32 units on this CPU, so its bound is no higher). Both are
measured before and after the timings and the better figure kept (a shared machine's dips).

    python -m bench.decode_roofline [--dtypes fp32 bf16] [--new 128] [--repeats 3] [--prompt 128]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
import transformers

from bench.common import interleaved_medians, write_result
from bench.roofline import best_of, decode_roofline, measure_machine, prefill_roofline
from moegpt.checkpoint.model_dir import save
from moegpt.config import preset
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import build_model

DEFAULT_PRESET, DEFAULT_PROMPT = "small", 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@torch.no_grad()
def bench_dtype(preset_name: str, name: str, new: int, repeats: int, prompt_len: int) -> dict:
    dtype = DTYPES[name]
    cfg = preset(preset_name)
    model = build_model(cfg, seed=0, dtype=dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as d:
        save(model, None, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype).eval()
    # no prefix caching: every repetition prefills its whole prompt (the same prompt would be cached)
    engine = LLMEngine(model, EngineConfig(kv_cache_bytes=64 * 2**20, prefix_caching=False))

    def ours(n):
        return list(engine.generate([prompt[0].tolist()], SamplingParams(max_tokens=n, temperature=0))[0].outputs[0].token_ids)

    def theirs(n):
        return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)[0, prompt_len:].tolist()

    same = ours(new) == theirs(new)
    t1_ours, t1_hf, tn_ours, tn_hf = interleaved_medians(
        [lambda: ours(1), lambda: theirs(1), lambda: ours(new), lambda: theirs(new)], repeats)
    return {"dtype": name, "cfg": cfg, "new": new, "prompt": prompt_len, "same": same,
            "times": (t1_ours, t1_hf, tn_ours, tn_hf)}


def report(timed: dict, preset_name: str, machine) -> dict:
    name, cfg, new, same, PROMPT = timed["dtype"], timed["cfg"], timed["new"], timed["same"], timed["prompt"]
    t1_ours, t1_hf, tn_ours, tn_hf = timed["times"]
    dtype = DTYPES[name]
    roof = decode_roofline(cfg, machine, 1, PROMPT + new / 2, torch.empty(0, dtype=dtype).element_size())
    pre = prefill_roofline(cfg, machine, PROMPT)
    row = {"dtype": name, "preset": preset_name, "batch": 1, "prompt": PROMPT, "new_tokens": new,
           "ours_decode_tokens_per_s": (new - 1) / (tn_ours - t1_ours),
           "hf_decode_tokens_per_s": (new - 1) / (tn_hf - t1_hf),
           "ours_end_to_end_tokens_per_s": new / tn_ours, "hf_end_to_end_tokens_per_s": new / tn_hf,
           "ours_prefill_tokens_per_s": PROMPT / t1_ours, "hf_prefill_tokens_per_s": PROMPT / t1_hf,
           "decode_roofline": roof, "prefill_roofline_tokens_per_s": pre["tokens_per_s"], "same_tokens": same}
    row["decode_speedup_vs_hf"] = row["ours_decode_tokens_per_s"] / row["hf_decode_tokens_per_s"]
    row["decode_roofline_fraction"] = row["ours_decode_tokens_per_s"] / roof["tokens_per_s"]
    row["prefill_roofline_fraction"] = row["ours_prefill_tokens_per_s"] / pre["tokens_per_s"]
    print(f"{name}  decode: moegpt {row['ours_decode_tokens_per_s']:6.1f} tok/s  transformers "
          f"{row['hf_decode_tokens_per_s']:6.1f}  ({row['decode_speedup_vs_hf']:.2f}x)  roofline "
          f"{roof['tokens_per_s']:6.1f} ({roof['bytes_per_step'] / 1e6:.0f} MB/token) -> "
          f"{row['decode_roofline_fraction']:.0%}   same greedy tokens: {same}")
    print(f"{name}  prefill {PROMPT}: moegpt {row['ours_prefill_tokens_per_s']:6.0f} tok/s  transformers "
          f"{row['hf_prefill_tokens_per_s']:6.0f}  fp32 matmul bound {pre['tokens_per_s']:6.0f} -> "
          f"{row['prefill_roofline_fraction']:.0%}")
    return row


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=DEFAULT_PROMPT, help="prompt tokens (the prefill measured)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--preset", default=DEFAULT_PRESET, help="a smaller one (tiny) for a quick smoke run")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    before = measure_machine()
    timed = [bench_dtype(args.preset, d, args.new, args.repeats, args.prompt) for d in args.dtypes]
    machine = best_of(before, measure_machine())
    print(f"batch-1 decode, {args.preset}, prompt {args.prompt}, {args.new} new tokens, greedy, {torch.get_num_threads()} "
          f"threads; read bandwidth {machine.read_bytes_per_s / 1e9:.1f} GB/s, fp32 matmul "
          f"{machine.fp32_flops / 1e9:.0f} GFLOP/s (best of before and after the timings)")
    rows = [report(t, args.preset, machine) for t in timed]
    name = "decode_roofline" if args.prompt == DEFAULT_PROMPT else f"decode_roofline_prompt{args.prompt}"
    print("wrote", write_result(name, {"machine_measured": machine.to_dict(), "rows": rows}))


if __name__ == "__main__":
    main()
