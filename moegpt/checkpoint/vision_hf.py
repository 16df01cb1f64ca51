"""A vision tower as a transformers CLIP-vision (or SigLIP-vision) directory, both ways.

``load_tower(dir)`` reads a ``CLIPVisionModel`` / ``SiglipVisionModel`` directory in either key
layout: hub files prefix every name with ``vision_model.`` (so do whole CLIP/SigLIP model
directories, whose text side is skipped); transformers 5 writes them unprefixed. ``save_tower``
writes the unprefixed layout with a config that ``CLIPVisionModel.from_pretrained`` loads.
``TOWER_NAMES`` is the one table between our parameter names and theirs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from moegpt.atomic import write_atomic, write_text_atomic
from moegpt.checkpoint.hf import read_safetensors
from moegpt.model.vision.tower import VisionTower
from moegpt.vision_config import TowerConfig, TowerKind

# ours -> transformers', per tower; "{i}" is an encoder layer
TOWER_NAMES: dict[str, str] = {
    "patch_embed.weight": "embeddings.patch_embedding.weight",
    "patch_embed.bias": "embeddings.patch_embedding.bias",
    "class_embed": "embeddings.class_embedding",
    "pos_embed.weight": "embeddings.position_embedding.weight",
    "pre_norm.weight": "pre_layrnorm.weight",  # (sic: CLIP's spelling)
    "pre_norm.bias": "pre_layrnorm.bias",
    "post_norm.weight": "post_layernorm.weight",
    "post_norm.bias": "post_layernorm.bias",
    "head.probe": "head.probe",
    "head.attention.in_proj_weight": "head.attention.in_proj_weight",
    "head.attention.in_proj_bias": "head.attention.in_proj_bias",
    "head.attention.out_proj.weight": "head.attention.out_proj.weight",
    "head.attention.out_proj.bias": "head.attention.out_proj.bias",
    "head.norm.weight": "head.layernorm.weight",
    "head.norm.bias": "head.layernorm.bias",
    "head.mlp.fc1.weight": "head.mlp.fc1.weight",
    "head.mlp.fc1.bias": "head.mlp.fc1.bias",
    "head.mlp.fc2.weight": "head.mlp.fc2.weight",
    "head.mlp.fc2.bias": "head.mlp.fc2.bias",
}
_BLOCK_NAMES = {
    "norm1": "layer_norm1", "norm2": "layer_norm2", "attn.wq": "self_attn.q_proj", "attn.wk": "self_attn.k_proj",
    "attn.wv": "self_attn.v_proj", "attn.wo": "self_attn.out_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}
_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$")
_HF_TYPES = {TowerKind.CLIP: ("clip_vision_model", "CLIPVisionModel", "clip"),
             TowerKind.SIGLIP: ("siglip_vision_model", "SiglipVisionModel", "siglip")}
PREFIX = "vision_model."


def hf_name(ours: str) -> str:
    m = _BLOCK.match(ours)
    if m:
        return f"encoder.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    return TOWER_NAMES[ours]


def tower_config_from_hf(d: dict, where: str = "config.json") -> TowerConfig:
    model_type = d.get("model_type")
    if model_type in ("clip", "siglip") and isinstance(d.get("vision_config"), dict):
        d = {"model_type": f"{model_type}_vision_model", **d["vision_config"]}  # a whole CLIP/SigLIP model
        model_type = d["model_type"]
    kinds = {types[0]: kind for kind, types in _HF_TYPES.items()}
    if model_type not in kinds:
        raise ValueError(f"{where}: model_type={model_type!r} is not a vision tower; want one of {sorted(kinds)}")
    kind = kinds[model_type]
    clip = kind == TowerKind.CLIP
    fields = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_channels": 3, "image_size": 224, "patch_size": 32 if clip else 16,
              "hidden_act": "quick_gelu" if clip else "gelu_pytorch_tanh", "layer_norm_eps": 1e-5 if clip else 1e-6}
    values = {k: d.get(k, default) for k, default in fields.items()}  # transformers' defaults where a key is absent
    try:
        return TowerConfig(
            kind=kind, image_size=values["image_size"], patch_size=values["patch_size"],
            num_channels=values["num_channels"], hidden_size=values["hidden_size"],
            intermediate_size=values["intermediate_size"], n_layers=values["num_hidden_layers"],
            n_heads=values["num_attention_heads"], layer_norm_eps=values["layer_norm_eps"],
            hidden_act=values["hidden_act"], use_head=not clip and bool(d.get("vision_use_head", True)))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def tower_config_to_hf(cfg: TowerConfig) -> dict:
    model_type, architecture, _ = _HF_TYPES[cfg.kind]
    d = {"architectures": [architecture], "model_type": model_type, "hidden_size": cfg.hidden_size,
         "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.n_layers,
         "num_attention_heads": cfg.n_heads, "num_channels": cfg.num_channels, "image_size": cfg.image_size,
         "patch_size": cfg.patch_size, "hidden_act": cfg.hidden_act, "layer_norm_eps": cfg.layer_norm_eps,
         "attention_dropout": 0.0}
    if cfg.kind == TowerKind.SIGLIP:
        d["vision_use_head"] = cfg.use_head
    return d


def tower_from_hf_state_dict(hf: dict[str, torch.Tensor], tower: VisionTower, where: str) -> dict[str, torch.Tensor]:
    """transformers' tensors (either layout) -> our state dict for ``tower``; names and shapes checked."""
    if any(k.startswith(PREFIX) for k in hf):
        hf = {k.removeprefix(PREFIX): v for k, v in hf.items() if k.startswith(PREFIX)}
    state, used = {}, set()
    for name, p in tower.state_dict().items():
        theirs = hf_name(name)
        if theirs not in hf:
            raise ValueError(f"{where}: tensor {theirs!r} is missing")
        if tuple(hf[theirs].shape) != tuple(p.shape):
            raise ValueError(f"{where}: tensor {theirs!r} has shape {tuple(hf[theirs].shape)}, "
                             f"the config implies {tuple(p.shape)}")
        state[name] = hf[theirs]
        used.add(theirs)
    unused = sorted(k for k in set(hf) - used if k != "embeddings.position_ids")
    if unused:
        raise ValueError(f"{where}: tensors the config does not use: {unused[:3]}{' ...' if len(unused) > 3 else ''}")
    return state


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object; one-line errors for a missing, unreadable or other file."""
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a JSON object")
    return d


def read_tower_config(directory: Path) -> TowerConfig:
    path = directory / "config.json"
    return tower_config_from_hf(read_json_object(path), where=str(path))


def load_tower(directory: str | Path, dtype: torch.dtype | None = None) -> VisionTower:
    """A CLIP-vision / SigLIP-vision directory -> VisionTower (``dtype`` None keeps the stored one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"vision tower directory {str(directory)!r} does not exist")
    cfg = read_tower_config(directory)
    with torch.device("meta"):
        tower = VisionTower(cfg)
    state = tower_from_hf_state_dict(read_safetensors(directory), tower, where=str(directory))
    tower.load_state_dict(state, assign=True)
    return tower if dtype is None else tower.to(dtype)


def save_tower(tower: VisionTower, directory: str | Path) -> Path:
    """Write ``tower`` as a directory transformers' CLIPVisionModel / SiglipVisionModel loads."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {hf_name(k): v.detach().cpu().contiguous() for k, v in tower.state_dict().items()}
    hf_config = tower_config_to_hf(tower.cfg)
    hf_config["torch_dtype"] = str(next(tower.parameters()).dtype).removeprefix("torch.")
    write_atomic(directory / "model.safetensors", lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(directory / "config.json", json.dumps(hf_config, indent=2) + "\n")
    return directory
