"""The *decode* stage's placement: on the event loop when it is cheap, in a worker thread when it is not.

What a decode costs follows the pixels, not the bytes: 2 kB of PNG can declare 4000 x 4000 pixels
(tens of milliseconds to inflate and resize), so the choice is made from the image headers, read
before any pixel is: a request whose images hold at most ``inline_decode_max_pixels`` in all is decoded
on the event loop (a thread hop would cost more than the decode), anything larger in a worker thread
(Pillow lets go of the GIL while it inflates and resizes), so one heavy request never stalls the
others or ``/healthz``. A body above ``INLINE_SPLIT_BYTES`` is split into its parts in the worker too.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from starlette.concurrency import run_in_threadpool

from bna_gateway.models.decode import ImageDecoder, ImageTooLarge, header_pixels
from bna_gateway.service.payload import ImagePart, split_payload

INLINE_SPLIT_BYTES = 1024 * 1024
"""Bodies up to this size are split into parts on the event loop (a memory scan, microseconds per kB)."""


@dataclass(frozen=True)
class DecodePolicy:
    max_images: int
    max_pixels: int  # per image, as the decoder enforces it
    inline_max_pixels: int  # per request


def request_pixels(parts: list[ImagePart], max_pixels: int) -> int | None:
    """Pixels the parts declare in all; None when a header cannot be read (the decoder will say why).

    An image declaring more than ``max_pixels`` is refused here, with the configured limit in the
    message, before anything is decompressed."""
    total = 0
    for i, part in enumerate(parts):
        pixels = header_pixels(part.data)
        if pixels is None:
            return None
        if pixels > max_pixels:
            raise ImageTooLarge(f"{part.describe(i)} declares {pixels} pixels; the limit is {max_pixels}")
        total += pixels
    return total


def decode_parts(decoder: ImageDecoder, parts: list[ImagePart]) -> torch.Tensor:
    """The parts decoded into one ``uint8`` batch ``[N, C, H, W]``.

    An image too large for the decoder here is one whose header Pillow itself refused (its own bomb
    guard, at twice the limit), so the answer names the configured limit rather than Pillow's."""
    images = []
    for i, part in enumerate(parts):
        what = part.describe(i)
        try:
            images.append(decoder(part.data, what))
        except ImageTooLarge:
            raise ImageTooLarge(f"{what} declares more pixels than the limit of {decoder.max_pixels}") from None
    return torch.stack(images)


def _split_and_decode(
    decoder: ImageDecoder, policy: DecodePolicy, content_type: str | None, body: bytes
) -> tuple[list[ImagePart], torch.Tensor]:
    parts = split_payload(content_type, body, policy.max_images)
    request_pixels(parts, policy.max_pixels)
    return parts, decode_parts(decoder, parts)


async def decode_request(
    decoder: ImageDecoder, policy: DecodePolicy, content_type: str | None, body: bytes
) -> tuple[list[ImagePart], torch.Tensor]:
    """Split the body into images and decode them, where their size says it is cheapest to."""
    if len(body) > INLINE_SPLIT_BYTES:
        return await run_in_threadpool(_split_and_decode, decoder, policy, content_type, body)
    parts = split_payload(content_type, body, policy.max_images)
    pixels = request_pixels(parts, policy.max_pixels)
    if pixels is not None and pixels <= policy.inline_max_pixels:
        return parts, decode_parts(decoder, parts)
    return parts, await run_in_threadpool(decode_parts, decoder, parts)
