"""The defender's images from a folder: ``root/<class>/<image>``, decoded as the gateway decodes them.

``ImageSet`` is images + labels (float [N, C, H, W] in [0, 1], int64 [N]); ``read_image_folder`` reads
a folder of class sub-folders with the one decoder of the product (``models.decode``), so an image is
preprocessed the same way offline and when the gateway serves it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from bna_gateway.models.decode import BadImage, ImageDecoder

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DatasetError(ValueError):
    """A dataset folder is missing or does not have the expected layout."""


@dataclass
class ImageSet:
    x: torch.Tensor  # float32 [N, C, H, W] in [0, 1]
    y: torch.Tensor  # int64 [N]

    def __len__(self) -> int:
        return int(self.y.numel())

    def subset(self, idx: torch.Tensor) -> "ImageSet":
        return ImageSet(self.x[idx], self.y[idx])

    def per_class(self, n: int | None, seed: int = 0) -> "ImageSet":
        """At most ``n`` images of every class (deterministic); all when ``n`` is None."""
        if n is None:
            return self
        return self.subset(take_per_class(self.y, n, seed))


def take_per_class(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero(as_tuple=True)[0]
        out.append(idx[torch.randperm(idx.numel(), generator=g)[:n]])
    return torch.cat(out).sort().values


def read_image_folder(root: str | Path, channels: int | None = None, size: tuple[int, int] | None = None,
                      class_names: list[str] | None = None) -> tuple[ImageSet, list[str], tuple[int, int, int]]:
    """Read ``root/<class>/<image>``. Classes are the sorted sub-folder names (or ``class_names``).

    ``channels`` and ``size`` default to the first image's. Returns the images, class names and C,H,W.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist (expected one sub-folder per class of images)")
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_names is None:
        class_names = [p.name for p in folders]
    else:
        missing = [c for c in class_names if not (root / c).is_dir()]
        if missing:
            raise DatasetError(f"image folder {root}: no sub-folder for classes {missing}")
    if len(class_names) < 2:
        raise DatasetError(f"image folder {root}: expected one sub-folder per class (at least 2), found {len(class_names)}")
    images: list[torch.Tensor] = []
    labels: list[int] = []
    for label, cname in enumerate(class_names):
        files = sorted(p for p in (root / cname).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"image folder {root}: class folder {cname!r} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            try:
                if channels is None or size is None:
                    with Image.open(f) as probe:
                        channels = channels or (1 if probe.mode in ("L", "1", "I", "I;16", "F") else 3)
                        size = size or (probe.size[1], probe.size[0])
                images.append(ImageDecoder(channels, size).read(f))
            except (BadImage, UnidentifiedImageError, OSError) as exc:
                raise DatasetError(f"image folder {root}: cannot read {f}: {exc}") from exc
            labels.append(label)
    assert channels is not None and size is not None
    return ImageSet(torch.stack(images), torch.tensor(labels)), class_names, (channels, size[0], size[1])
