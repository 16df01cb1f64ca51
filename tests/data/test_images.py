"""Image preprocessing equals transformers' PIL image processors bit for bit; decoding names what is
wrong with bad image bytes."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from moegpt.data.images import ImageError, ImageLimits, ImageProcessing, decode_image, preprocess
from moegpt.vision_config import TowerConfig

transformers = pytest.importorskip("transformers", reason="HF parity needs the dev extra (transformers)")


def _images():
    rng = np.random.default_rng(0)
    palette = Image.fromarray(rng.integers(0, 256, (33, 17), dtype=np.uint8), "L").convert("P")
    palette.info["transparency"] = 7
    return [
        Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)),  # wide
        Image.fromarray(rng.integers(0, 256, (70, 29, 4), dtype=np.uint8), "RGBA"),  # tall, transparent
        Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L"),  # grey, smaller than the tower
        Image.fromarray(rng.integers(0, 256, (12, 90, 3), dtype=np.uint8)),  # very wide
        palette,  # a palette with a transparent colour
    ]


def _hf_processor(kind: str, proc: ImageProcessing):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    cls = CLIPImageProcessorPil if kind == "clip" else SiglipImageProcessorPil
    return cls(**proc.to_hf(TowerConfig(kind=kind).kind))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_preprocessing_equals_transformers_pil_processor(kind):
    tower = TowerConfig(kind=kind, image_size=30, patch_size=6, hidden_size=48, n_heads=4)
    proc = ImageProcessing.for_tower(tower)
    expected = torch.from_numpy(np.stack(_hf_processor(kind, proc)(_images(), return_tensors="np")["pixel_values"]))
    got = preprocess(_images(), proc)
    assert got.shape == (5, 3, 30, 30) and got.dtype == torch.float32
    assert torch.equal(got, expected)


def test_center_crop_larger_than_the_resize_pads_as_transformers():
    proc = ImageProcessing(size=24, shortest_edge=True, crop_size=31, mean=(0.1, 0.2, 0.3), std=(0.3, 0.2, 0.1))
    expected = np.stack(_hf_processor("clip", proc)(_images(), return_tensors="np")["pixel_values"])
    assert torch.equal(preprocess(_images(), proc), torch.from_numpy(expected))


def test_processor_config_round_trips_through_preprocessor_config(tmp_path):
    tower = TowerConfig(kind="siglip", image_size=30, patch_size=6, hidden_size=48, n_heads=4)
    proc = ImageProcessing.for_tower(tower)
    proc.save(tmp_path, tower.kind)
    assert ImageProcessing.load(tmp_path, tower) == proc
    with pytest.raises(ValueError, match="images come out 30 pixels wide; the tower takes 64"):
        ImageProcessing.load(tmp_path, TowerConfig(kind="siglip", image_size=64, patch_size=8, hidden_size=48,
                                                   n_heads=4))


def _encoded(fmt: str, size=(9, 7)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, format=fmt)
    return buffer.getvalue()


def test_png_and_jpeg_decode():
    for fmt in ("PNG", "JPEG"):
        image = decode_image(_encoded(fmt))
        assert image.size == (9, 7) and image.format == fmt


@pytest.mark.parametrize("data,status,message", [
    (b"not an image at all", 400, "image is not a readable image"),
    (_encoded("GIF"), 400, "image is GIF; only PNG and JPEG are accepted"),
    (_encoded("PNG", (64, 64))[:-40], 400, "image is truncated or corrupt"),
    (_encoded("PNG", (100, 100)), 413, "image is 100x100 pixels, over the 5000-pixel limit"),
    (b"\x89PNG" + bytes(6000), 413, "image is 6004 bytes, over the 5000-byte limit"),
], ids=["garbage", "gif", "truncated", "pixels", "bytes"])
def test_bad_image_bytes_name_the_problem_and_the_status(data, status, message):
    with pytest.raises(ImageError, match=message) as e:
        decode_image(data, ImageLimits(max_bytes=5000, max_pixels=5000))
    assert e.value.status == status
