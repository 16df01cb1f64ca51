"""Images in, pixel values out: decoding (PNG/JPEG bytes) and the CLIP/SigLIP preprocessing, equal to
transformers' PIL image processors (CLIPImageProcessorPil, SiglipImageProcessorPil) on the same
images, without torchvision.

convert to RGB (transparency composited onto white) -> resize (bicubic; CLIP: the shortest edge,
SigLIP: both) -> center crop (CLIP) -> x / 255 (float64, then float32) -> (x - mean) / std.

Legend: N images, C channels (3), H x W pixels.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moegpt.vision_config import TowerConfig, TowerKind

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP's mean and std
BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the value preprocessor_config.json stores
FORMATS = ("PNG", "JPEG")  # what the server and `moegpt generate --image` accept
PREPROCESSOR_FILE = "preprocessor_config.json"


@dataclass(frozen=True, kw_only=True)
class ImageProcessing:
    """How an image becomes a tower's input: transformers' image-processor fields."""

    size: int  # the shortest edge's target (shortest_edge=True), else both sides'
    shortest_edge: bool
    crop_size: int | None  # center crop after the resize; None: no crop
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: int = BICUBIC
    rescale_factor: float = 1 / 255

    @staticmethod
    def for_tower(cfg: TowerConfig) -> "ImageProcessing":
        """transformers' defaults for the tower's kind, at its image size."""
        if cfg.kind == TowerKind.CLIP:
            return ImageProcessing(size=cfg.image_size, shortest_edge=True, crop_size=cfg.image_size,
                                   mean=CLIP_MEAN, std=CLIP_STD)
        return ImageProcessing(size=cfg.image_size, shortest_edge=False, crop_size=None, mean=HALF, std=HALF)

    @property
    def output_size(self) -> int:
        return self.crop_size if self.crop_size is not None else self.size

    def to_hf(self, kind: TowerKind) -> dict:
        d = {"image_processor_type": "CLIPImageProcessor" if kind == TowerKind.CLIP else "SiglipImageProcessor",
             "do_resize": True, "size": {"shortest_edge": self.size} if self.shortest_edge
             else {"height": self.size, "width": self.size}, "resample": self.resample,
             "do_center_crop": self.crop_size is not None, "do_rescale": True, "rescale_factor": self.rescale_factor,
             "do_normalize": True, "image_mean": list(self.mean), "image_std": list(self.std), "do_convert_rgb": True}
        if self.crop_size is not None:
            d["crop_size"] = {"height": self.crop_size, "width": self.crop_size}
        return d

    @staticmethod
    def from_hf(d: dict, where: str) -> "ImageProcessing":
        size = d.get("size", {})
        crop = d.get("crop_size") if d.get("do_center_crop", False) else None
        if isinstance(size, int):
            size = {"shortest_edge": size}
        if "shortest_edge" in size:
            side, shortest = size["shortest_edge"], True
        elif size.get("height") is not None and size.get("height") == size.get("width"):
            side, shortest = size["height"], False
        else:
            raise ValueError(f"{where}: image size {size!r} is not supported (want shortest_edge, or a square)")
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        if crop is not None and crop.get("height") != crop.get("width"):
            raise ValueError(f"{where}: crop_size {crop!r} is not square")
        if not d.get("do_resize", True) or not d.get("do_normalize", True) or not d.get("do_rescale", True):
            raise ValueError(f"{where}: only processors that resize, rescale and normalise are supported")
        return ImageProcessing(size=int(side), shortest_edge=shortest,
                               crop_size=None if crop is None else int(crop["height"]),
                               mean=tuple(d.get("image_mean", CLIP_MEAN)), std=tuple(d.get("image_std", CLIP_STD)),
                               resample=int(d.get("resample", BICUBIC)),
                               rescale_factor=float(d.get("rescale_factor", 1 / 255)))

    def save(self, directory: Path, kind: TowerKind) -> None:
        from moegpt.atomic import write_text_atomic

        write_text_atomic(directory / PREPROCESSOR_FILE, json.dumps(self.to_hf(kind), indent=2) + "\n")

    @staticmethod
    def load(directory: Path, cfg: TowerConfig) -> "ImageProcessing":
        """The directory's preprocessor_config.json, or the tower kind's defaults when it has none."""
        path = directory / PREPROCESSOR_FILE
        if not path.exists():
            return ImageProcessing.for_tower(cfg)
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON ({e})") from None
        proc = ImageProcessing.from_hf(d, where=str(path))
        if proc.output_size != cfg.image_size:
            raise ValueError(f"{path}: images come out {proc.output_size} pixels wide; the tower takes {cfg.image_size}")
        return proc


def to_rgb(image):
    """A PIL image in RGB, transparency composited onto white (as transformers' convert_to_rgb)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def resized_shape(height: int, width: int, proc: ImageProcessing) -> tuple[int, int]:
    """(height, width) after the resize: the short side to ``size``, the long one scaled and floored."""
    if not proc.shortest_edge:
        return proc.size, proc.size
    short, long = min(height, width), max(height, width)
    new_long = int(proc.size * long / short)
    return (new_long, proc.size) if width <= height else (proc.size, new_long)


def center_crop(x: np.ndarray, size: int) -> np.ndarray:
    """x (C, H, W) -> (C, size, size) from the middle, zero-padded where the image is smaller."""
    _, h, w = x.shape
    if h < size or w < size:  # pad the short side(s) evenly, the extra pixel before (as transformers)
        ph, pw = max(size, h), max(size, w)
        padded = np.zeros((x.shape[0], ph, pw), dtype=x.dtype)
        top, left = -(-(ph - h) // 2), -(-(pw - w) // 2)
        padded[:, top:top + h, left:left + w] = x
        x, h, w = padded, ph, pw
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, top:top + size, left:left + size]


def preprocess(images: list, proc: ImageProcessing) -> torch.Tensor:
    """PIL images of any size and mode -> pixel values (N, 3, S, S) float32."""
    from PIL import Image

    out = []
    for image in images:
        image = to_rgb(image)
        h, w = resized_shape(image.height, image.width, proc)
        x = np.asarray(image.resize((w, h), resample=Image.Resampling(proc.resample)))  # (H, W, 3) uint8
        x = np.moveaxis(x, -1, 0)  # (3, H, W)
        if proc.crop_size is not None:
            x = center_crop(x, proc.crop_size)
        x = (x.astype(np.float64) * proc.rescale_factor).astype(np.float32)
        mean, std = np.array(proc.mean, dtype=np.float32), np.array(proc.std, dtype=np.float32)
        x = ((x.T - mean) / std).T
        out.append(torch.from_numpy(np.ascontiguousarray(x)))
    return torch.stack(out)


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """What a request may carry: images are decoded only within these."""

    max_bytes: int = 20 * 2 ** 20
    max_pixels: int = 4096 * 4096


class ImageError(ValueError):
    """A bad image; ``status`` is the HTTP status a server answers with (400, or 413 for too large)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def decode_image(data: bytes, limits: ImageLimits = ImageLimits(), what: str = "image"):
    """PNG or JPEG bytes -> a loaded PIL image, or an ImageError saying what is wrong with them."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageError(f"{what} is {len(data)} bytes, over the {limits.max_bytes}-byte limit", status=413)
    try:
        image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError(f"{what} is not a readable image") from None
    if image.format not in FORMATS:
        raise ImageError(f"{what} is {image.format}; only {' and '.join(FORMATS)} are accepted")
    if image.width * image.height > limits.max_pixels:
        raise ImageError(f"{what} is {image.width}x{image.height} pixels, over the {limits.max_pixels}-pixel limit",
                         status=413)
    try:
        image.load()
    except (OSError, ValueError, Image.DecompressionBombError):
        raise ImageError(f"{what} is truncated or corrupt") from None
    return image
