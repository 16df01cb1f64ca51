"""A vision model's images in the engine: the checks a request's images pass, their encoding when
the request is added (tower, resampler, each gated layer's keys and values, into the image cache),
and the cache blocks each completion holds until it finishes or is aborted.

Legend: L latents per image, Dv latent width.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from moegpt.data.tokenizer import IMAGE, Tokenizer
from moegpt.infer.image_cache import ImageCacheFull, ImageKVCache
from moegpt.model import compute_weight
from moegpt.model.vision.vision_model import VisionMoEGPT


class RequestImages:
    def __init__(self, model: VisionMoEGPT, num_blocks: int):
        self.model = model
        v, param = model.vision_cfg, compute_weight(model)
        self.cache = ImageKVCache(v.cross_attention_layers, num_blocks, v.n_latents, v.cross_attention_heads,
                                  v.cross_attention_head_dim, param.dtype, param.device)

    def positions(self, prompt_ids: Seq[int], images: Seq[torch.Tensor], tokenizer: Tokenizer | None) -> list[int]:
        """The positions of the prompt's image tokens, one per image; one-line errors otherwise."""
        image_id = tokenizer.token_to_id(IMAGE) if tokenizer is not None else None
        if images and image_id is None:
            raise ValueError(f"images need an engine with a tokenizer that has the {IMAGE} token")
        positions = [i for i, t in enumerate(prompt_ids) if t == image_id]
        if len(positions) != len(images):
            raise ValueError(f"the prompt has {len(positions)} image tokens ({IMAGE}) but {len(images)} images")
        limit = self.model.vision_cfg.max_images
        if len(images) > limit:
            raise ValueError(f"{len(images)} images in one request; the model takes at most {limit}")
        for p in images:
            self.model.tower.check_pixels(p[None])
        return positions

    def _filler(self, pixels: torch.Tensor):
        def fill(block: int) -> None:
            with torch.no_grad():
                latents = self.model.encode_images(pixels[None].to(compute_weight(self.model).device))  # (1, L, Dv)
                self.cache.write(block, self.model.image_keys_values(latents))
        return fill

    def acquire(self, images: Seq[torch.Tensor], digests: Seq[bytes], n: int) -> list[tuple[int, ...]]:
        """Each of ``n`` completions' image blocks: cached images shared, the others encoded now (all
        or none: ImageCacheFull leaves nothing held)."""
        blocks, held = self.cache.blocks, []
        try:
            for _ in range(n):
                for pixels, digest in zip(images, digests):
                    held.append(blocks.acquire(digest, self._filler(pixels)))
        except ImageCacheFull:
            self.release(held)
            raise
        per = len(images)
        return [tuple(held[i * per:(i + 1) * per]) for i in range(n)]

    def release(self, held: Seq[int]) -> None:
        for block in held:
            self.cache.blocks.release(block)
