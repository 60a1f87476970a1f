"""The bundle being served: loaded from the path it is given, checked, with its predictor and decoder.

A :class:`ServedBundle` is one immutable unit: a request takes the current one when it starts and uses
it to the end (decoder, predictor, class names, ``bundle_version``), so a bundle swap in the middle of a
request (``rollout``) never mixes two bundles in one answer.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from bna_gateway.models.bundle import BundleError, LoadedBundle, load_bundle
from bna_gateway.models.decode import ImageDecoder
from bna_gateway.service.metrics import GatewayMetrics
from bna_gateway.service.predict import Predictor

log = logging.getLogger(__name__)


def resolve(path: Path) -> Path:
    """The directory a bundle path names now, through any chain of symlinks."""
    return Path(os.path.realpath(path))


def load_checked(path: Path, device: torch.device) -> LoadedBundle:
    """Verify and load the bundle at ``path`` onto ``device``.

    Anything that keeps it from loading (missing or tampered files, an unknown architecture, weights
    that do not fit it) is a :class:`BundleError` with the reason, so ``bna serve`` reports
    ``bna serve: error: ...`` (exit 2) and a roll-out logs one line, never a traceback.
    """
    try:
        return load_bundle(path, device)
    except BundleError:
        raise
    except Exception as exc:  # a bundle is untrusted input: any failure to build it is the bundle's fault
        raise BundleError(f"cannot load the bundle at {path}: {exc}") from exc


@dataclass(frozen=True)
class ServedBundle:
    bundle: LoadedBundle
    predictor: Predictor
    decoder: ImageDecoder
    path: Path  # the resolved directory it was loaded from

    @classmethod
    def build(
        cls,
        bundle: LoadedBundle,
        path: Path,
        device: torch.device,
        metrics: GatewayMetrics,
        max_pixels: int,
        graph: Literal["frozen", "eager"],
    ) -> "ServedBundle":
        decoder = ImageDecoder.for_input(bundle.manifest.model.input, max_pixels)
        return cls(bundle, Predictor(bundle, device, metrics, graph), decoder, resolve(path))

    @property
    def version(self) -> str:
        return self.bundle.manifest.bundle_version

    @property
    def class_names(self) -> list[str]:
        return self.bundle.manifest.model.class_names

    def publish(self, metrics: GatewayMetrics, device: torch.device) -> None:
        """``bna_bundle_info`` names this bundle; its per-target series start at zero."""
        manifest = self.bundle.manifest
        metrics.set_bundle(
            manifest.bundle_version,
            manifest.model.arch,
            str(device),
            self.bundle.router.targets,
            {t.target: t.sources for t in manifest.twins},
        )

    def describe(self) -> str:
        m = self.bundle.manifest
        return (
            f"bundle {m.bundle_version} from {self.path}: {m.model.arch}, {m.model.num_classes} classes, "
            f"twins for targets {self.bundle.router.targets}"
        )
