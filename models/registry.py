"""Architecture registry: a built-in name, or an import path ``package.module:factory``."""
from __future__ import annotations

import importlib
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


class ArchitectureError(ValueError):
    """The architecture name or import path cannot be resolved."""


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
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ArchitectureError(f"cannot import module {module_name!r} for architecture {arch!r}: {exc}") from exc
    factory = module
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
