"""A vision model directory: the text model stays an HF Mixtral directory that transformers loads,
with the image side beside it.

    DIR/config.json, model.safetensors, tokenizer.*   the text model (model_dir.py)
    DIR/vision_tower/                                  a CLIP-vision / SigLIP-vision directory with its
                                                       preprocessor_config.json (transformers loads it)
    DIR/vision_config.json                             moegpt's VisionConfig (resampler, gated blocks)
    DIR/vision_adapter.safetensors                     the resampler's and the gated blocks' weights
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moegpt.atomic import write_atomic, write_text_atomic
from moegpt.checkpoint.vision_hf import load_tower, read_json_object, save_tower
from moegpt.data.images import ImageProcessing
from moegpt.model import MoEGPT
from moegpt.model.vision.vision_model import VisionMoEGPT
from moegpt.vision_config import VisionConfig

TOWER_DIR = "vision_tower"
CONFIG_FILE = "vision_config.json"
ADAPTER_FILE = "vision_adapter.safetensors"
IO_FILE = "vision_io.json"  # the training data's measured I/O per token (the planner reads it)


def has_vision(directory: Path) -> bool:
    return (directory / CONFIG_FILE).exists()


def read_vision_config(directory: Path) -> VisionConfig:
    path = directory / CONFIG_FILE
    d = read_json_object(path)
    try:
        return VisionConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: {e}") from None


def write_vision_io(directory: Path, measured: dict[str, float]) -> None:
    """What a vision training run measured of its data's I/O per training token (VisionData.
    bytes_per_token), with the planner's two figures: the bundled text's bytes per token and the
    image sources' raw pixel bytes per token (their mean), the article's ~600 vs ~4."""
    pixels = [v for k, v in measured.items() if k.endswith("_pixel_bytes_per_token")]
    summary = {"text_bytes_per_token": measured["text_bytes_per_token"],
               "vision_bytes_per_token": sum(pixels) / len(pixels), "measured": measured}
    write_text_atomic(directory / IO_FILE, json.dumps(summary, indent=2) + "\n")


def read_vision_io(directory: Path) -> dict[str, float] | None:
    """``write_vision_io``'s two figures ({"text_bytes_per_token", "vision_bytes_per_token"}); None
    where the directory has no record (one-line errors for a malformed one)."""
    path = directory / IO_FILE
    if not path.exists():
        return None
    d = read_json_object(path)
    out = {}
    for key in ("text_bytes_per_token", "vision_bytes_per_token"):
        v = d.get(key)
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
            raise ValueError(f"{path}: {key}={v!r} is not a positive number")
        out[key] = float(v)
    return out


def adapter_state(model: VisionMoEGPT) -> dict[str, torch.Tensor]:
    """The resampler's and gated blocks' tensors, under their names in the vision model."""
    return {k: v for k, v in model.state_dict().items() if k.startswith(("resampler.", "cross_attn."))}


def attach_vision(text: MoEGPT, directory: Path) -> VisionMoEGPT:
    """Join ``text`` to the vision part stored in ``directory``; every mismatch is a one-line error."""
    from safetensors.torch import load_file

    cfg = read_vision_config(directory)
    try:
        cfg.check_fits(text.cfg)
    except ValueError as e:
        raise ValueError(f"{directory / CONFIG_FILE}: {e}") from None
    tower_dir = directory / TOWER_DIR
    if not tower_dir.is_dir():
        raise ValueError(f"{directory}: {CONFIG_FILE} is there but the {TOWER_DIR}/ directory is missing")
    tower = load_tower(tower_dir)
    if tower.cfg != cfg.tower:
        raise ValueError(f"{tower_dir}: the tower's config differs from {CONFIG_FILE}'s: {tower.cfg} vs {cfg.tower}")
    dtype = text.embed.weight.dtype
    with torch.device("meta"):  # the new parts' shapes only: their weights come from the files
        vision = VisionMoEGPT(text, cfg, tower)
    path = directory / ADAPTER_FILE
    try:
        adapter = load_file(path)
    except FileNotFoundError:
        raise ValueError(f"{path} is missing") from None
    except Exception as e:  # safetensors raises several types for truncated files
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None
    expected = adapter_state(vision)
    for name, p in expected.items():
        if name not in adapter:
            raise ValueError(f"{path}: tensor {name!r} is missing")
        if tuple(adapter[name].shape) != tuple(p.shape):
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(adapter[name].shape)}, "
                             f"{CONFIG_FILE} implies {tuple(p.shape)}")
    extra = sorted(set(adapter) - set(expected))
    if extra:
        raise ValueError(f"{path}: tensors {CONFIG_FILE} does not use: {extra[:3]}")
    vision.resampler.load_state_dict({k.removeprefix("resampler."): v for k, v in adapter.items()
                                      if k.startswith("resampler.")}, assign=True)
    vision.cross_attn.load_state_dict({k.removeprefix("cross_attn."): v for k, v in adapter.items()
                                       if k.startswith("cross_attn.")}, assign=True)
    device = text.embed.weight.device
    for module in vision.vision_modules().values():
        module.to(device=device, dtype=dtype)
    return vision.eval()


def save_vision(model: VisionMoEGPT, directory: Path, processing: ImageProcessing | None = None) -> None:
    """Write the vision part of ``model`` into ``directory`` (model_dir.save writes the text part)."""
    from safetensors.torch import save_file

    tower_dir = save_tower(model.tower, directory / TOWER_DIR)
    (processing or ImageProcessing.for_tower(model.vision_cfg.tower)).save(tower_dir, model.vision_cfg.tower.kind)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state(model).items()}
    write_atomic(directory / ADAPTER_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(directory / CONFIG_FILE, json.dumps(model.vision_cfg.to_dict(), indent=2) + "\n")


def read_image_processing(directory: str | Path) -> ImageProcessing:
    """How the directory's vision model wants its images prepared."""
    directory = Path(directory)
    return ImageProcessing.load(directory / TOWER_DIR, read_vision_config(directory).tower)
