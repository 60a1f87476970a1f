"""Architecture registry: a built-in name, or an import path ``package.module:factory``."""
from __future__ import annotations

import importlib
import logging
from typing import Any, Callable

from torch import nn

from bna_gateway.models import architectures

ModelFactory = Callable[..., nn.Module]

ARCHITECTURES: dict[str, ModelFactory] = {
    "resnet18": architectures.resnet18,
    "preact_resnet18": architectures.preact_resnet18,
    "mobilenetv2": architectures.mobilenetv2,
    "vgg16_bn": architectures.vgg16_bn,
}


log = logging.getLogger(__name__)
# before 0.2 this project installed its architectures as the top-level package ``models``; a bundle or
# model directory that names them by that import path still loads (docs/bundle.md#compatibility)
LEGACY_PREFIX = "models.architectures"


class ArchitectureError(ValueError):
    """The architecture name or import path cannot be resolved."""


def _import(module_name: str, arch: str) -> Any:
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        if module_name == LEGACY_PREFIX or module_name.startswith(LEGACY_PREFIX + "."):
            log.warning("architecture %r names this project's modules by their old import path; loading "
                        "bna_gateway.%s instead (rebuild the bundle to record the new path)", arch, module_name)
            return importlib.import_module(f"bna_gateway.{module_name}")
        raise ArchitectureError(f"cannot import module {module_name!r} for architecture {arch!r}: {exc}") from exc


def resolve_factory(arch: str) -> ModelFactory:
    """Return the factory for a registered name or an importable ``module:callable`` path."""
    if arch in ARCHITECTURES:
        return ARCHITECTURES[arch]
    if ":" not in arch:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ArchitectureError(
            f"unknown architecture {arch!r}: use one of {known}, or an import path 'package.module:factory'"
        )
    module_name, _, attr = arch.partition(":")
    factory = _import(module_name, arch)
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ArchitectureError(f"module {module_name!r} has no attribute {attr!r}")
    if not callable(factory):
        raise ArchitectureError(f"{arch!r} is not callable")
    return factory  # type: ignore[return-value]


def build_model(arch: str, kwargs: dict[str, Any] | None = None) -> nn.Module:
    """Instantiate an architecture; the result must be an ``nn.Module``."""
    model = resolve_factory(arch)(**(kwargs or {}))
    if not isinstance(model, nn.Module):
        raise ArchitectureError(f"{arch!r} returned {type(model).__name__}, not a torch.nn.Module")
    return model
