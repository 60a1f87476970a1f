"""Frozen inference graphs for serving: f, or f with a twin's BatchNorm statistics, traced and frozen.

Why: in eager mode every tensor op of a forward is dispatched from Python and needs the GIL. The
gateway's event loop holds the GIL while it parses and decodes requests, so its inference thread
waits for it at every op, and a busy gateway runs its model at a fraction of the model's own speed. A
frozen TorchScript graph runs all its ops in C++ without taking the GIL, and freezing folds each
BatchNorm, the twin's statistics included, into the convolution before it. The first effect is
checked by tests/test_frozen.py, both are measured by bench/serving.py (bench/README.md).

Safety: tracing records the one path the example took through the module, so a forward that
branches on its input, or bakes a batch size into a reshape, would be traced wrongly. A trace is
therefore used only if it agrees with the eager module on random batches of three sizes (every
logit within ``ATOL`` + ``RTOL`` x |logit|); otherwise, or when tracing fails (a module TorchScript
cannot trace; a torch without TorchScript, which upstream has deprecated), the module is served
eagerly and the reason is returned for the log. docs/http.md#settings (``BNA_INFERENCE_GRAPH``).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass

import torch
from torch import nn

ATOL = 1e-4
RTOL = 1e-3
CHECK_BATCH_SIZES = (1, 3, 8)


@dataclass(frozen=True)
class Frozen:
    """The outcome of :func:`freeze`: the graph to run (``None``: run the module eagerly) and why."""

    graph: torch.jit.ScriptModule | None
    reason: str


def with_buffers(module: nn.Module, buffers: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``module`` whose named buffers (``state_dict`` keys) are replaced by ``buffers``."""
    twin = copy.deepcopy(module)
    result = twin.load_state_dict(buffers, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"the module has no buffers named {result.unexpected_keys[:3]}")
    return twin


def freeze(module: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> Frozen:
    """Trace ``module`` (in eval mode) on inputs ``[N, *input_shape]`` in [0, 1], freeze it, and keep
    it only if it matches the eager module (see the module docstring)."""
    module = module.eval()
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, *input_shape, generator=generator).to(device)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TorchScript's deprecation and tracer warnings: checked below
            graph = torch.jit.freeze(torch.jit.trace(module, example, check_trace=False))
            for n in CHECK_BATCH_SIZES:
                x = torch.rand(n, *input_shape, generator=generator).to(device)
                expected, got = module(x), graph(x)
                if got.shape != expected.shape or not torch.allclose(got, expected, atol=ATOL, rtol=RTOL):
                    gap = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
                    return Frozen(None, f"the traced graph differs from the module at batch size {n} (max |diff| {gap:.3g})")
    except Exception as exc:  # noqa: BLE001 - whatever tracing cannot handle is served eagerly
        return Frozen(None, f"tracing failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    return Frozen(graph, "frozen")
