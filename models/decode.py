"""Image decoding and validation with Pillow: bytes in, a ``uint8`` tensor ``[C, H, W]`` out.

The one decoder of the product: the gateway decodes request bodies with it, and the offline job reads
the defender's clean folder (and an image blend pattern) with it, so one file is preprocessed the same
way offline and online.

What happens to an image, in order: the header is parsed (only the formats in ``ALLOWED_FORMATS``; never
EPS and friends, which would run external programs), its dimensions are checked against the pixel
limit *before* any pixel is decompressed (decompression bombs and absurd dimensions -> 413), the
first frame is decoded (truncated or corrupt data -> 400), EXIF orientation is applied, the mode is
converted to the model's channels (1 -> ``L``, 3 -> ``RGB``) and the image is resized to the model's
``(H, W)``. Scaling to [0, 1] and normalisation happen later, on the whole batch, inside the model.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from bna_gateway.models.spec import InputSpec

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 16_000_000

ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


class BadImage(ValueError):
    """An image the decoder refuses; the gateway answers it with a 4xx (see its error handlers)."""


class UndecodableImage(BadImage):
    """Empty, truncated, corrupt, or not an image of an accepted format."""


class ImageTooLarge(BadImage):
    """More pixels than the configured limit (a decompression bomb, say)."""


def configure_pillow(max_pixels: int) -> None:
    """Process-wide Pillow guards: pixel limit, decompression-bomb warnings raised as errors, and no
    silent acceptance of truncated files."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ImageDecoder:
    """Decodes one encoded image into ``channels`` x ``size`` (``uint8``, ``[C, H, W]``)."""

    channels: int
    size: tuple[int, int]  # (H, W)
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def for_input(cls, spec: InputSpec, max_pixels: int = DEFAULT_MAX_PIXELS) -> "ImageDecoder":
        """The decoder for a model's input (its channels and height x width)."""
        return cls(spec.channels, (spec.shape[1], spec.shape[2]), max_pixels)

    @property
    def mode(self) -> str:
        return "L" if self.channels == 1 else "RGB"

    def __call__(self, data: bytes, what: str = "image") -> torch.Tensor:
        if not data:
            raise UndecodableImage(f"{what} is empty")
        try:
            return self._decode(data, what)
        except BadImage:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"{what} is too large: {exc}") from None
        except UnidentifiedImageError:
            formats = ", ".join(ALLOWED_FORMATS)
            raise UndecodableImage(f"{what} is not a recognised image (accepted formats: {formats})") from None
        except Exception as exc:  # hostile bytes make Pillow raise almost anything; all are the client's fault
            log.debug("cannot decode %s", what, exc_info=True)
            reason = str(exc) or type(exc).__name__
            raise UndecodableImage(f"{what} cannot be decoded: {reason}") from None

    def _decode(self, data: bytes, what: str) -> torch.Tensor:
        height, width = self.size
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            w, h = img.size
            if w <= 0 or h <= 0:
                raise UndecodableImage(f"{what} has no pixels ({w}x{h})")
            if w * h > self.max_pixels:
                raise ImageTooLarge(f"{what} is {w}x{h} = {w * h} pixels; the limit is {self.max_pixels}")
            side = max(width, height)
            img.draft(self.mode, (side, side))  # JPEG only: decode at a reduced scale when that suffices
            img.load()
            out = ImageOps.exif_transpose(img)
        if out.mode in _SIXTEEN_BIT_MODES:
            out = out.point(lambda v: v / 256)  # 16-bit greyscale -> 8-bit range
        if out.mode != self.mode:
            out = out.convert(self.mode)
        if out.size != (width, height):
            out = out.resize((width, height), Image.Resampling.BILINEAR)
        arr = np.array(out, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr).permute(2, 0, 1).contiguous()

    def decode_many(self, payloads: Sequence[tuple[bytes, str]]) -> torch.Tensor:
        """Decode every ``(data, description)`` pair into one ``uint8`` batch ``[N, C, H, W]``."""
        return torch.stack([self(data, what) for data, what in payloads])

    def read(self, path: Path) -> torch.Tensor:
        """A file decoded and scaled to float ``[C, H, W]`` in [0, 1] (the offline job's images)."""
        return to_unit(self(Path(path).read_bytes(), str(path)))


def header_pixels(data: bytes) -> int | None:
    """Width x height an encoded image declares in its header, read without decoding any pixel (a PNG's
    IHDR directly, other formats through Pillow's lazy open); None when no accepted header is found.
    The gateway uses it to choose where to decode a request: the byte count says little (a few kB of
    PNG can declare 16 M pixels)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR":
        return int.from_bytes(data[16:20], "big") * int.from_bytes(data[20:24], "big")
    try:
        with Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS) as img:
            w, h = img.size
    except Exception:  # not an accepted format, or a header Pillow refuses (a bomb: the decoder says so)
        return None
    return w * h


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """``uint8`` images -> float32 in [0, 1] (the range every part of the product feeds the model)."""
    return images.float().div_(255.0)
