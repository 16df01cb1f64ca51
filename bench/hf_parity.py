"""HF parity figures: max |logit difference| between moegpt and transformers' Mixtral, both ways, fp32."""

from __future__ import annotations

import tempfile

import torch
import transformers

from bench.common import write_result
from moegpt.checkpoint.model_dir import load, save
from moegpt.config import preset
from moegpt.model import build_model


def hf_random(n_kv_heads: int):
    cfg = transformers.MixtralConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                     num_attention_heads=8, num_key_value_heads=n_kv_heads, num_local_experts=16,
                                     num_experts_per_tok=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


@torch.no_grad()
def main() -> None:
    tokens = torch.randint(0, 1000, (4, 128), generator=torch.Generator().manual_seed(0))
    rows = []
    for label, kv in (("hf->moegpt, MQA (1 KV head)", 1), ("hf->moegpt, GQA (2 KV heads)", 2)):
        hf = hf_random(kv)
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours, _ = load(d)
        rows.append({"case": label, "max_abs_diff": (ours(tokens).logits - hf(tokens).logits).abs().max().item()})
    ours = build_model(preset("tiny").replace(vocab_size=1000), seed=0).eval()
    with tempfile.TemporaryDirectory() as d:
        save(ours, None, d)
        hf = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
    rows.append({"case": "moegpt->hf, tiny shape (MQA, 16 experts)",
                 "max_abs_diff": (ours(tokens).logits - hf(tokens).logits).abs().max().item()})
    print("logit parity with transformers (fp32, 4 x 128 tokens, random weights)")
    for r in rows:
        print(f"  {r['case']:<42} max |diff| = {r['max_abs_diff']:.2e}")
    print("wrote", write_result("hf_parity", {"rows": rows}))


if __name__ == "__main__":
    main()
