"""Offline generation over the engine, in vLLM's shape: prompts in, ``RequestOutput``s out.

    from moegpt import LLM, SamplingParams     # was: from vllm import LLM, SamplingParams
    llm = LLM(model="runs/demo")
    for o in llm.generate(["ROMEO:", "def f(x):"], SamplingParams(temperature=0.8, max_tokens=50, seed=0)):
        print(o.prompt, o.outputs[0].text, o.outputs[0].finish_reason)

A prompt is a string, a list of token ids, or vLLM's ``{"prompt": ...}`` / ``{"prompt_token_ids": ...}``
(with a vision model, vLLM's ``"multi_modal_data": {"image": PIL image or a list of them}`` beside
it, one image per image token in the prompt);
``sampling_params`` is one ``SamplingParams`` for every prompt, or one per prompt. As in vLLM,
``LLM(model, seed=S)`` seeds the requests that bring no seed of their own (request i: S + i, so a
script's outputs repeat run to run), and ``generate(..., use_tqdm=True)`` shows a progress bar.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

from moegpt.checkpoint.model_dir import load
from moegpt.checkpoint.vision_dir import read_image_processing
from moegpt.data.images import preprocess
from moegpt.data.tokenizer import Tokenizer
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.outputs import RequestOutput
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model.vision.vision_model import VisionMoEGPT

Prompt = str | Sequence[int] | Mapping[str, object]


class LLM:
    """A model directory (moegpt's or any HF Mixtral one, with its tokenizer) and its engine."""

    def __init__(self, model: str | Path, config: EngineConfig = EngineConfig(), draft_model: str | Path | None = None,
                 *, seed: int | None = None, shards=None):
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed={seed!r} must be an integer or None")
        self.seed, self._requests = seed, 0
        # shards: rank 0 of a sharded model (infer/sharded.py ``start``), which loaded its shard of ``model``
        self.model, self.tokenizer = load(model) if shards is None else (shards.model, shards.tokenizer)
        if self.tokenizer is None:
            raise ValueError(f"{model} has no tokenizer (tokenizer.json or a sentencepiece tokenizer.model)")
        self.draft = None
        if draft_model is not None:
            self.draft, draft_tok = load(draft_model)
            if draft_tok is None or draft_tok.fingerprint != self.tokenizer.fingerprint:
                raise ValueError(f"draft {draft_model} does not share the tokenizer of {model}")
        self.config = config
        self.image_processing = read_image_processing(model) if isinstance(self.model, VisionMoEGPT) else None
        self.engine = LLMEngine(self.model, config, self.tokenizer, self.draft, shards=shards)

    def _prompt(self, prompt: Prompt) -> tuple[str | None, list[int], list]:
        """-> (the text, or None for token ids; the token ids; the images' pixel values)."""
        images = []
        if isinstance(prompt, Mapping):
            images = self._images(prompt.get("multi_modal_data"))
            if "prompt_token_ids" in prompt:
                return None, list(prompt["prompt_token_ids"]), images
            if "prompt" in prompt:
                prompt = prompt["prompt"]
            else:
                raise ValueError(f"prompt {dict(prompt)!r} has neither 'prompt' nor 'prompt_token_ids'")
        if isinstance(prompt, str):
            tok = self.tokenizer
            return prompt, tok.encode(prompt, add_special_tokens=True), images
        return None, list(prompt), images

    def _images(self, data: Mapping | None) -> list:
        if not data:
            return []
        unknown = set(data) - {"image"}
        if unknown:
            raise ValueError(f"multi_modal_data: only 'image' is supported, not {sorted(unknown)}")
        if self.image_processing is None:
            raise ValueError("this model has no vision part: it takes no images")
        images = data["image"] if isinstance(data["image"], (list, tuple)) else [data["image"]]
        return list(preprocess(images, self.image_processing))

    def get_tokenizer(self) -> Tokenizer:
        return self.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Completions for every prompt (``n`` each), run together on the engine; outputs in prompt order."""
        if isinstance(prompts, (str, Mapping)) or (isinstance(prompts, Sequence) and prompts
                                                   and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt
        texts, ids, images = zip(*(self._prompt(p) for p in prompts)) if prompts else ((), (), ())
        params = SamplingParams() if sampling_params is None else sampling_params
        per_prompt = [params] * len(ids) if isinstance(params, SamplingParams) else list(params)
        if self.seed is not None:  # the LLM's seed for the requests without one
            per_prompt = [p if p.seed is not None else dataclasses.replace(p, seed=self.seed + self._requests + i)
                          for i, p in enumerate(per_prompt)]
            self._requests += len(per_prompt)
        bar = None
        if use_tqdm:
            from tqdm.auto import tqdm
            bar = tqdm(total=len(ids), desc="generate", unit="prompt", dynamic_ncols=True)
        try:
            outputs = self.engine.generate(list(ids), per_prompt, on_output=None if bar is None else lambda o: bar.update(1),
                                           images=list(images))
        finally:
            if bar is not None:
                bar.close()
        return [dataclasses.replace(o, prompt=text) for o, text in zip(outputs, texts)]
