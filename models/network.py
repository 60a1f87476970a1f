"""The deployable network: normalisation in front of the user's module, and BN-layer discovery."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bna_gateway.models.registry import build_model
from bna_gateway.models.spec import InputSpec, ModelSpec

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``x`` in [0, 1]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Classifier(nn.Module):
    """``net(normalize(x))``: every part of the product feeds images scaled to [0, 1]."""

    def __init__(self, net: nn.Module, input_spec: InputSpec) -> None:
        super().__init__()
        self.normalize = Normalize(input_spec.mean, input_spec.std)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


def backbone(model: nn.Module) -> tuple[nn.Module, str]:
    """The network whose BatchNorm statistics a twin replaces, and its name prefix inside ``model``:
    a ``Classifier``'s ``net`` (prefix ``"net."``), or any other module itself (prefix ``""``). Twin
    statistics are keyed by BN layer names relative to it, so they do not depend on the wrapper."""
    if isinstance(model, Classifier):
        return model.net, "net."
    return model, ""


def bn_layers(module: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer with running statistics, found by type whatever the model calls it."""
    return {
        name: m
        for name, m in module.named_modules()
        if isinstance(m, BN_TYPES) and m.track_running_stats and m.running_mean is not None
    }


def build_classifier(spec: ModelSpec) -> Classifier:
    kwargs = dict(spec.arch_kwargs)
    return to_channels_last(Classifier(build_model(spec.arch, kwargs), spec.input), spec.input)


def to_channels_last(clf: Classifier, input_spec: InputSpec) -> Classifier:
    """Convolution weights in channels-last layout, where the module accepts it.

    oneDNN's NHWC kernels make a ResNet-18's forward + backward about 1.5x faster on an AVX2 CPU
    (``bench/layout.py``); results are the same up to float rounding. A module written for
    contiguous NCHW activations (``.view`` after a convolution, say) fails a probe forward in
    this layout and keeps the default one. Weights are saved contiguous either way.
    """
    if not any(p.dim() == 4 for p in clf.parameters()):
        return clf
    clf.to(memory_format=torch.channels_last)
    was_training = clf.training
    clf.eval()
    try:
        with torch.no_grad():
            clf(torch.zeros(2, *input_spec.shape))
    except Exception:  # noqa: BLE001 - any failure: keep the layout the module was written for
        clf.to(memory_format=torch.contiguous_format)
    finally:
        clf.train(was_training)
    return clf


def save_weights(net: nn.Module, path: Path) -> None:
    """State dict as safetensors (no pickle)."""
    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(path))


def load_weights(net: nn.Module, path: Path) -> None:
    """Load a state dict from safetensors, or from a ``.pt``/``.pth`` file with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold a state dict")
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"weights in {path} do not fit the architecture: missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
