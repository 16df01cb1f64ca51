"""The article's stated set-ups, as planner inputs: fleets, layouts, workloads, prices.

These are inputs the article gives (25,000 A100s, 8-way TP x 15-way PP, 13T tokens, $1 per A100-hour,
...); the figures it *derives* from them appear only as claims in article_*.py, never here.
"""

from __future__ import annotations

from dataclasses import replace

from moegpt.planner.hardware import Hardware, datasheet
from moegpt.planner.inputs import make_inputs
from moegpt.planner.plan import Plan, plan

# article: "about 25,000 A100s", "8-way tensor parallelism ... 15-way pipeline parallelism",
# "about 13 trillion tokens", "batch size of 60 million" tokens, "8k" pre-training context,
# "probably ZeRO stage 1", "about $1 per A100-hour in the cloud"
TRAIN_A100 = dict(preset="gpt4", hardware="a100-40gb", mode="train", tp=8, pp=15, gpus=25_000, tokens=13e12,
                  batch_tokens=60_000_000, seq_len=8192, zero_stage=1, gpu_hour_usd=1.0)
TRAIN_MFU_RANGE = (0.32, 0.36)  # article: "32% to 36%" (an input to the days; days are checked)
TRAIN_DAYS_RANGE = (90, 100)  # article: "90 to 100 days" (an input to the MFU; MFU is checked)
# article: "about 8,192 H100s for about 55 days ... $2 per H100-hour"
TRAIN_H100 = dict(TRAIN_A100, hardware="h100-sxm", gpus=8192, gpu_hour_usd=2.0)
H100_DAYS = 55
# article: non-blocking 800G/1.6T inside each part of the cluster, "only 200G/400G" between parts
ISLAND_LINK_GBPS_PER_NODE = (200, 400)
DGX_A100_GBPS_PER_GPU = 200  # one 200 Gb/s HDR NIC per GPU (the datasheet entry's figure)
# article: "128 GPUs ... 8-way tensor parallelism and 16-way pipeline parallelism", batch "4k+",
# GPT-4 "8k sequence length", 40 GB A100s
SERVE_A100 = dict(preset="gpt4", hardware="a100-40gb", tp=8, pp=16, gpus=128, batch=4096, context=8192,
                  gpu_hour_usd=1.0)
SERVE_H100 = dict(SERVE_A100, hardware="h100-sxm", gpu_hour_usd=2.0)
# article's bandwidth chart: 8 GPUs with 8-way TP, batch 1; "unfused operations, the attention's memory
# bandwidth and hardware overhead" together "equal the parameter reads": a 2x overhead that already
# holds the KV reads, so the chart's plans stream a 1-token context (no KV added on top)
CHART_OVERHEAD = 2.0
H100_WHITEPAPER_HBM = 3072e9  # the earlier Hopper-whitepaper figure other tools use (PLANNER.md)
CHART_8XH100 = dict(preset="dense-1t", hardware="h100-sxm", tp=8, gpus=8, batch=1, context=1,
                    overhead_factor=CHART_OVERHEAD)
# article: reading speed "about 250 words per minute ... some up to 1,000"
WORDS_PER_MIN = (250, 1000)
TOKENS_PER_WORD_IMPLIED = 2.0  # what 8.33 tokens/s from 250 words/min implies (English is ~1.33)
CHINCHILLA_PARAMS = 70e9  # Hoffmann et al. 2022
GPT3_TOKENS = 300e9  # GPT-3's training tokens (Brown et al. 2020), for the compute ratio
# article (PaLM inference paper): "500B+ model with multi-head attention", "batch 512, context 2048"
KV_MHA = dict(preset="palm540b-mha", hardware="a100-80gb", batch=512, context=2048)
# article: "each token ... about 600 bytes, rather than 4 bytes for text"
BYTES_PER_TOKEN = dict(bytes_per_token_text=4, bytes_per_token_vision=600)
DRAFT_TOKENS = 4  # article: speculative sequences of "about 4 tokens"
ACCEPTANCE = 0.8  # an assumption (not in the article): per-token draft acceptance rate


def run(base: dict | None = None, **changes) -> Plan:
    """The plan of a set-up (``base``) with some inputs changed."""
    return plan(make_inputs(**{**(base or {}), **changes}))


def with_hbm(name: str, bytes_per_s: float) -> Hardware:
    """A datasheet entry with another memory bandwidth (e.g. H100's earlier 3,072 GB/s figure)."""
    return replace(datasheet(name), hbm_bytes_per_s=bytes_per_s)
