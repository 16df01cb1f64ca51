"""moegpt: a GPT-4-style sparse Mixture-of-Experts LLM system on PyTorch.

    import moegpt
    model, tokenizer = moegpt.load("runs/demo")      # any HF Mixtral directory
    moegpt.save(model, tokenizer, "out/")             # loads in transformers too
    llm = moegpt.LLM("runs/demo")                     # offline generation, as vllm.LLM

The public names are resolved on first use (PEP 562), so ``import moegpt.config`` loads neither the
engine nor tokenizers nor safetensors.
"""

from __future__ import annotations

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "load": "moegpt.checkpoint.model_dir", "save": "moegpt.checkpoint.model_dir",
    "PRESETS": "moegpt.config", "MLPKind": "moegpt.config", "ModelConfig": "moegpt.config", "preset": "moegpt.config",
    "EngineConfig": "moegpt.infer.engine", "LLMEngine": "moegpt.infer.engine", "LLM": "moegpt.infer.llm",
    "CompletionOutput": "moegpt.infer.outputs", "RequestOutput": "moegpt.infer.outputs",
    "SamplingParams": "moegpt.infer.sampling_params",
    "MoEGPT": "moegpt.model", "build_model": "moegpt.model",
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'moegpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
