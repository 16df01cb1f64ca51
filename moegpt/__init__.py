"""moegpt: a GPT-4-style sparse Mixture-of-Experts LLM system on PyTorch.

    import moegpt
    model, tokenizer = moegpt.load("runs/demo")      # any HF Mixtral directory
    moegpt.save(model, tokenizer, "out/")             # loads in transformers too
"""

from moegpt.checkpoint.model_dir import load, save
from moegpt.config import PRESETS, MLPKind, ModelConfig, preset
from moegpt.infer.engine import EngineConfig, LLMEngine, Request
from moegpt.infer.llm import LLM
from moegpt.infer.sampling import SamplingParams
from moegpt.model import MoEGPT, build_model

__all__ = ["LLM", "PRESETS", "EngineConfig", "LLMEngine", "MLPKind", "ModelConfig", "MoEGPT", "Request",
           "SamplingParams", "build_model", "load", "preset", "save"]
__version__ = "0.1.0"
