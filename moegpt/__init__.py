"""moegpt: a GPT-4-style sparse Mixture-of-Experts LLM system on PyTorch.

    import moegpt
    model, tokenizer = moegpt.load("runs/demo")      # any HF Mixtral directory
    moegpt.save(model, tokenizer, "out/")             # loads in transformers too
"""

from moegpt.checkpoint.model_dir import load, save
from moegpt.config import PRESETS, MLPKind, ModelConfig, preset
from moegpt.infer.engine import EngineConfig, LLMEngine
from moegpt.infer.llm import LLM
from moegpt.infer.outputs import CompletionOutput, RequestOutput
from moegpt.infer.sampling_params import SamplingParams
from moegpt.model import MoEGPT, build_model

__all__ = ["LLM", "PRESETS", "CompletionOutput", "EngineConfig", "LLMEngine", "MLPKind", "ModelConfig", "MoEGPT",
           "RequestOutput", "SamplingParams", "build_model", "load", "preset", "save"]
__version__ = "0.1.0"
