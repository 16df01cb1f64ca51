"""Images in chat requests: OpenAI's ``{"type": "image_url", "image_url": {"url": "data:..."}}``
content parts -> pixel values for the engine, or an OpenAI error naming what is wrong.

Only data URLs are taken (the server fetches nothing); PNG and JPEG, within the byte and pixel
limits (413 past them), decoded and prepared as the model's image processor does (data/images.py).
"""

from __future__ import annotations

import base64
import binascii

import torch

from moegpt.data.images import ImageError, ImageLimits, ImageProcessing, decode_image, preprocess
from moegpt.serve.errors import APIError, bad_request


def request_images(urls: list[str], processing: ImageProcessing | None, limits: ImageLimits, max_images: int,
                   model_name: str) -> list[torch.Tensor]:
    """The images of a request's messages, in order -> pixel values (3, S, S) each."""
    if not urls:
        return []
    if processing is None:
        raise bad_request(f"the model '{model_name}' takes no images (it has no vision part)", "messages")
    if len(urls) > max_images:
        raise bad_request(f"{len(urls)} images in one request; the model takes at most {max_images}", "messages")
    images = []
    for i, url in enumerate(urls):
        what = f"image {i}"
        if not url.startswith("data:"):
            raise bad_request(f"{what}: only data URLs (data:image/png;base64,...) are accepted; the server fetches "
                              f"nothing ({url[:40]!r})", "messages")
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise bad_request(f"{what}: a data URL must be base64-encoded (data:image/png;base64,...)", "messages")
        if len(payload) > 4 * (limits.max_bytes // 3 + 1):
            raise APIError(413, f"{what} is over the {limits.max_bytes}-byte limit", param="messages")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad_request(f"{what}: the data URL is not valid base64", "messages") from None
        try:
            images.append(decode_image(data, limits, what))
        except ImageError as e:
            raise APIError(e.status, str(e), param="messages") from None
    return list(preprocess(images, processing))
