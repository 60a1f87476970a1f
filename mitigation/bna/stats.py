"""Reading and overriding BatchNorm layers' statistics without touching the module's weights."""
from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

from bna_gateway.models.network import backbone, bn_layers

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # BN layer name -> (mean, var)


def channel_view(out: torch.Tensor, grid: int | None = None) -> torch.Tensor:
    """BN output [N, C, *] -> [C, N * prod(*)].

    With ``grid``, a [N, C, H, W] map keeps only a fixed strided grid of about ``grid x grid``
    positions (the same positions for every image): neighbouring positions are strongly correlated,
    so the histogram keeps its shape at a fraction of the cost.
    """
    if grid is not None and out.dim() == 4:
        h, w = out.shape[2:]
        sh, sw = max(1, h // grid), max(1, w // grid)
        out = out[:, :, sh // 2 :: sh, sw // 2 :: sw]
    return out.transpose(0, 1).reshape(out.shape[1], -1)


def normalise(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, bn: nn.Module) -> torch.Tensor:
    """BN in inference form, differentiable in ``mean`` and ``var`` (F.batch_norm is not, in eval mode)."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    out = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
    if bn.weight is not None:
        out = out * bn.weight.view(shape) + bn.bias.view(shape)
    return out


OTHER_NORMS = (nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm, nn.LocalResponseNorm)


class NoBatchNormError(ValueError):
    """The model has no BatchNorm layer with running statistics, the only thing a twin changes."""


def twin_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """The BN layers a twin re-fits, named relative to the model's network (``models.network.backbone``)."""
    return bn_layers(backbone(model)[0])


def require_twin_layers(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``twin_layers``, or ``NoBatchNormError`` saying why a twin cannot be built (and what still works)."""
    layers = twin_layers(model)
    if layers:
        return layers
    net = backbone(model)[0]
    others = sorted({type(m).__name__ for m in net.modules() if isinstance(m, OTHER_NORMS)})
    plain = sorted({type(m).__name__ for m in net.modules()
                    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats})
    found = (f" (it normalises with {', '.join(others + [f'{n} without running statistics' for n in plain])})"
             if others or plain else "")
    raise NoBatchNormError(
        f"{type(net).__name__} has no BatchNorm layer with running statistics{found}: a BNA twin differs from "
        "the model only in those statistics, so no twin can be built for it. 'bna detect' works on any model.")


@contextmanager
def capture_bn_outputs(model: nn.Module, sink: Callable[[str, torch.Tensor], None],
                       stats: Stats | None = None) -> Iterator[None]:
    """Within the block every BN layer's output goes to ``sink(name, output)`` (names as ``twin_layers``).

    With ``stats`` ({name: (mean, var)}), those layers normalise with the given (differentiable)
    statistics instead of their buffers.
    """
    handles = []
    for name, bn in twin_layers(model).items():
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor, name: str = name):
            if stats is not None and name in stats:
                mean, var = stats[name]
                output = normalise(inputs[0], mean, var, module)
            sink(name, output)
            return output

        handles.append(bn.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def reestimate_bn(model: nn.Module, x: torch.Tensor, chunk: int = 512) -> Stats:
    """BN statistics re-estimated on ``x`` (cumulative average over chunks), from a copy of ``model``."""
    twin = copy.deepcopy(model)
    layers = twin_layers(twin)
    for bn in layers.values():
        bn.reset_running_stats()
        bn.momentum = None
    twin.train()
    for i in range(0, len(x), chunk):
        twin(x[i : i + chunk])
    return {n: (bn.running_mean.clone(), bn.running_var.clone()) for n, bn in layers.items()}
