"""The number format of detection's forward and backward passes through the suspect model.

Detection is thousands of forward/backward passes of a frozen network on small batches of triggered
images; the model's weights never change. Where the hardware multiplies bfloat16 natively (x86 CPUs
with AVX512-BF16 or AMX, Arm CPUs with BF16, CUDA GPUs from Ampere on), running those passes under
``torch.autocast`` in bfloat16 roughly halves their cost; elsewhere bfloat16 is emulated and slower, so
``auto`` keeps float32 there. Only the passes run in bfloat16: triggers, their gradients, sizes, losses
and every statistic stay float32 (``reverse.py`` casts the logits back). docs/method.md#precision.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import ContextManager

import torch

FORMATS = ("float32", "bfloat16")  # what a pass runs in
PRECISIONS = ("auto", *FORMATS)  # what a user may ask for
_DTYPES = {"bfloat16": torch.bfloat16}


def native_bfloat16(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies bfloat16 natively (not by emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.get_device_capability(device)[0] >= 8)
    if device.type != "cpu":
        return False
    return bool(_cpu_flags() & {"avx512_bf16", "amx_bf16", "bf16"})


def _cpu_flags() -> set[str]:
    """The CPU's feature flags: torch's own probe (newer torch) and Linux's /proc/cpuinfo, together."""
    probe = getattr(torch.cpu, "get_capabilities", None)
    flags = {k for k, v in probe().items() if v is True} if probe is not None else set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    return flags | {flag for line in text.splitlines() if line.startswith(("flags", "Features"))
                    for flag in line.split(":", 1)[-1].split()}


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """The concrete format for ``precision`` on ``device``: ``auto`` is bfloat16 where it is native."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision == "auto":
        return "bfloat16" if native_bfloat16(device) else "float32"
    return precision


def autocast(precision: str, device: torch.device | str) -> ContextManager[object]:
    """The context the suspect model's passes run in: autocast to ``precision``'s dtype, or nothing."""
    if precision not in FORMATS:
        raise ValueError(f"a pass runs in {' or '.join(FORMATS)}, not {precision!r} (resolve 'auto' first: "
                         "resolve_precision)")
    if precision not in _DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=_DTYPES[precision])
