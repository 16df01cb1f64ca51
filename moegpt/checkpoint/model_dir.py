"""Save and load model directories in HF Mixtral's format (weights + config + tokenizer).

``load(dir)`` reads any Mixtral directory, including one written by transformers'
``MixtralForCausalLM.save_pretrained``; ``save(model, tokenizer, dir)`` writes one that
``transformers.AutoModelForCausalLM.from_pretrained`` loads. Each file is written atomically.
A vision model (model/vision) keeps its image side beside the text model's files (vision_dir.py):
``load`` brings the whole model back unless ``text_only``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import torch

from moegpt.atomic import write_atomic, write_text_atomic
from moegpt.checkpoint.hf import config_from_hf, config_to_hf, from_hf_state_dict, read_safetensors, to_hf_state_dict
from moegpt.config import ModelConfig
from moegpt.data.tokenizer import SENTENCEPIECE_FILE, Tokenizer
from moegpt.model import MoEGPT, build_model
from moegpt.quant.scheme import QuantScheme


class LoadedModel(NamedTuple):
    model: MoEGPT  # or a VisionMoEGPT
    tokenizer: Tokenizer | None  # None when the directory has neither tokenizer.json nor tokenizer.model


def _write_json(path: Path, obj: dict) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_config(directory: str | Path) -> ModelConfig:
    return config_from_hf(read_hf_config(directory), where=str(Path(directory) / "config.json"))


def read_hf_config(directory: str | Path) -> dict:
    """config.json as a dict; one-line errors for a missing directory, file or bad JSON."""
    directory = Path(directory)
    path = directory / "config.json"
    if not directory.is_dir():
        raise ValueError(f"model directory {str(directory)!r} does not exist")
    try:
        d = json.loads(path.read_text())
        if not isinstance(d, dict):
            raise ValueError(f"{path} is not a JSON object")
        return d
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None


def read_directory(directory: Path) -> tuple[ModelConfig, QuantScheme | None, Tokenizer | None]:
    """A model directory's config, its quantization scheme (None: full precision) and its tokenizer
    (None: it has none), before any tensor is read."""
    from moegpt.checkpoint.quantized import scheme_from_config

    hf_config = read_hf_config(directory)
    cfg = config_from_hf(hf_config, where=str(directory / "config.json"))
    qc = hf_config.get("quantization_config")
    scheme = None if qc is None else scheme_from_config(qc, str(directory / "config.json"))
    has_tokenizer = (directory / "tokenizer.json").exists() or (directory / SENTENCEPIECE_FILE).exists()
    return cfg, scheme, Tokenizer.load(directory) if has_tokenizer else None


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         text_only: bool = False) -> LoadedModel:
    """Load a Mixtral-format model directory. ``dtype`` None keeps the stored dtype. A directory with
    a vision part loads as a VisionMoEGPT, unless ``text_only`` (text-only rows compute the same)."""
    from moegpt.checkpoint.vision_dir import attach_vision, has_vision

    from moegpt.checkpoint.quantized import attach_quantized, quantizes_embedding, split_quantized

    directory = Path(directory)
    cfg, scheme, tokenizer = read_directory(directory)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{directory}: tokenizer vocab ({tokenizer.vocab_size}) exceeds model vocab_size ({cfg.vocab_size})")
    tensors = read_safetensors(directory)
    quantized = {} if scheme is None else split_quantized(
        tensors, cfg, scheme, str(directory), quantizes_embedding(read_hf_config(directory)["quantization_config"]))
    state = from_hf_state_dict(tensors, cfg)
    with torch.device("meta"):
        model = MoEGPT(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:  # from_hf_state_dict guarantees every name is present
            raise ValueError(f"{directory}: tensor {name} has shape {tuple(state[name].shape)}, config implies {shape}")
    model.load_state_dict(state, assign=True)
    if dtype is not None:
        model = model.to(dtype)
    if scheme is not None:  # (after the dtype: a scale stays fp32 whatever the model's dtype)
        attach_quantized(model, quantized, scheme, model.norm.weight.dtype)
    model = model.to(device)
    if has_vision(directory) and not text_only:
        return LoadedModel(attach_vision(model.eval(), directory), tokenizer)
    return LoadedModel(model.eval(), tokenizer)


def save(model: MoEGPT, tokenizer: Tokenizer | None, directory: str | Path) -> Path:
    """Write ``model`` (and ``tokenizer``) as an HF Mixtral directory; returns the directory. A
    VisionMoEGPT writes its text model so, and its image side beside it (vision_dir.py)."""
    from safetensors.torch import save_file

    from moegpt.checkpoint.quantized import hf_quantized_tensors, quantized_config
    from moegpt.checkpoint.vision_dir import save_vision
    from moegpt.model.vision.vision_model import VisionMoEGPT

    if isinstance(model, VisionMoEGPT):
        directory = save(model.text, tokenizer, directory)
        save_vision(model, directory)
        return directory
    cfg = model.cfg
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer vocab ({tokenizer.vocab_size}) exceeds model vocab_size ({cfg.vocab_size})")
    ids = {k: getattr(tokenizer, k, None) for k in ("bos_id", "eos_id", "pad_id")}
    hf_config = config_to_hf(cfg, ids["bos_id"], ids["eos_id"], ids["pad_id"])  # raises for non-Mixtral shapes
    dtype = model.norm.weight.dtype
    hf_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    quantization = quantized_config(model)
    if quantization is not None:
        hf_config["quantization_config"] = quantization
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plain = {k: v for k, v in model.state_dict().items() if ".parametrizations." not in k}  # quantized: below
    tensors = {k: v.detach().cpu() for k, v in to_hf_state_dict(plain).items()}
    if quantization is not None:
        tensors.update(hf_quantized_tensors(model))
    write_atomic(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    _write_json(directory / "config.json", hf_config)
    generation = {"bos_token_id": ids["bos_id"], "eos_token_id": ids["eos_id"], "pad_token_id": ids["pad_id"]}
    _write_json(directory / "generation_config.json", generation)
    if tokenizer is not None:
        tokenizer.save(directory)
    return directory
