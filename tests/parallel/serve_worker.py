"""Worker for the sharded-serving parity tests, started by torch.distributed.run:
``serve_worker.py OUT MODELS SCENARIO...``.

Each scenario is a serving layout over this launch's ranks (``LAYOUTS``) and a model directory of
MODELS (``mqa``, ``gqa``, ``tied``, the quantized ``int8``, ``int4`` and ``fp8``, and ``draft`` for
the draft proposer). Every rank loads its shard; rank 0 drives the same timeline of requests through
the sharded engine and then through a one-process engine (continuous batching: requests join while
others decode; a shared prompt prefix for the prefix cache; a small KV cache that forces preemption;
an abort), and writes per scenario whether every completion's tokens are identical, the largest
log-probability difference (also over the tokens before each completion's first that differs), the
preemptions and prefix-cache use, whether every KV block is free at the end, and each rank's
pipeline times to OUT/SCENARIO.json.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import sys
from pathlib import Path

import torch

from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.llm import LLM
from moegpt.infer.sampling_params import SamplingParams
from moegpt.infer.sharded import start
from moegpt.infer.speculative import SpeculativeConfig, SpeculativeMethod
from moegpt.parallel.process_group import close_distributed
from moegpt.parallel.serving import serve_layout

LAYOUTS = {  # name: (layout, model, speculative)
    "tp2": (dict(tp=2), "mqa", None), "tp2-gqa": (dict(tp=2), "gqa", None),
    "pp2": (dict(pp=2), "mqa", None), "pp2-first1-tied": (dict(pp=2, first_stage_layers=1), "tied", None),
    "ep2": (dict(ep=2), "mqa", None),
    "tp2-ngram": (dict(tp=2), "mqa", "ngram"), "tp2-draft": (dict(tp=2), "mqa", "draft"),
    "tp2xpp2": (dict(tp=2, pp=2), "gqa", None), "ep2xtp2": (dict(ep=2, tp=2), "mqa", None),
    "pp2xep2": (dict(pp=2, ep=2), "mqa", None),
    # the collectives between machines (all-to-all dispatch, gloo's all-reduce) instead of shared memory
    "tp2-gloo": (dict(tp=2), "mqa", None), "ep2-alltoall": (dict(ep=2), "mqa", None),
    "ep2xtp2-alltoall": (dict(ep=2, tp=2), "gqa", None),
    # quantized directories: each rank reads its share of the packed weights and scales
    "tp2-int8": (dict(tp=2), "int8", None), "tp2-int4": (dict(tp=2), "int4", None),
    "ep2-int8": (dict(ep=2), "int8", None), "pp2-fp8": (dict(pp=2), "fp8", None),
    "ep2xtp2-int4": (dict(ep=2, tp=2), "int4", None), "ep2-int8-alltoall": (dict(ep=2), "int8", None),
}
BLOCK, BLOCKS = 4, 14  # a KV cache small enough that the timeline preempts


def timeline(engine: LLMEngine) -> dict:
    """The same requests, joining and leaving at the same steps -> {"rid:index": (tokens, logprobs)}."""
    g = torch.Generator().manual_seed(0)
    vocab = engine.model.cfg.vocab_size
    prefix = torch.randint(3, vocab, (9,), generator=g).tolist()
    prompts = [prefix + torch.randint(3, vocab, (3 + i,), generator=g).tolist() for i in range(6)]
    params = [SamplingParams(temperature=0.0, max_tokens=10, logprobs=1, ignore_eos=True),
              SamplingParams(temperature=0.9, seed=11, max_tokens=10, logprobs=1, ignore_eos=True),
              SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=12, max_tokens=8, logprobs=1, ignore_eos=True)] * 2
    out: dict[str, list] = {}

    def step():
        for u in engine.step():
            tokens, logprobs = out.setdefault(f"{u.request_id}:{u.index}", ([], []))
            tokens.extend(u.new_token_ids)
            logprobs.extend(lp.logprob for lp in u.logprobs)

    rids = [engine.add_request(p, sp) for p, sp in zip(prompts[:3], params[:3])]
    step()
    step()
    rids += [engine.add_request(p, sp) for p, sp in zip(prompts[3:], params[3:])]
    step()
    engine.abort(rids[4])
    while engine.has_work:
        step()
    return out


def main(out_dir: Path, models: Path, scenarios: list[str]) -> None:
    for name in scenarios:
        layout, model, spec = LAYOUTS[name]
        model_dir = models / model
        speculative = None if spec is None else SpeculativeConfig(
            method=SpeculativeMethod.NGRAM if spec == "ngram" else SpeculativeMethod.DRAFT, num_tokens=3)
        draft = models / "draft" if spec == "draft" else None
        config = EngineConfig(block_size=BLOCK, num_kv_blocks=BLOCKS, speculative=speculative)
        world = start(model_dir, serve_layout(**layout), timeout_s=60,
                      shared_memory=not name.endswith(("-gloo", "-alltoall")))
        if not world.is_driver:
            world.follow(config)
            continue
        engine = LLM(model_dir, config, draft_model=draft, shards=world).engine
        got = timeline(engine)
        stats = dataclasses.replace(engine.stats)
        all_free = engine.blocks.num_free_blocks == stats.kv_blocks_total
        times = world.stop()
        want = timeline(LLM(model_dir, config, draft_model=draft).engine)
        diff = max((abs(a - b) for k in want if k in got for a, b in zip(got[k][1], want[k][1])), default=0.0)
        # up to each completion's first token that differs (quantized activations round a value that
        # differs in its last bit, from another order of the TP sum, to another step)
        agreed = [(a, b) for k in want if k in got
                  for (_, a), (_, b) in itertools.takewhile(lambda p: p[0][0] == p[1][0], zip(zip(*got[k]), zip(*want[k])))]
        diff_agreed = max((abs(a - b) for a, b in agreed), default=0.0)
        result = dict(identical=sorted(got) == sorted(want) and all(got[k][0] == want[k][0] for k in want),
                      completions=len(want), max_logprob_diff=diff, max_logprob_diff_agreed=diff_agreed,
                      tokens_agreed=len(agreed), tokens=sum(len(v[0]) for v in want.values()), preemptions=stats.preemptions,
                      aborted=stats.aborted, spec_proposed=stats.spec_proposed, all_blocks_free=all_free,
                      bubbles=[t.bubble for t in times], steps=stats.steps)
        (out_dir / f"{name}.json").write_text(json.dumps(result))
    close_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:])
