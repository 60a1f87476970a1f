"""Channels-last versus contiguous (NCHW) convolution weights: the cost of the passes the offline job makes.

Usage:
    python bench/layout.py [--arch resnet18] [--dataset-shape 1,28,28] [--batch 512] [--repeats 5]
                           [--device cpu|cuda] [--threads N]

Builds the registry architecture twice (``build_classifier`` picks channels-last where the module
accepts it; the other copy is put back to the contiguous layout), with the same weights, and times
three passes on random images: a forward in eval mode (evaluation, serving), a forward + backward to
the input in eval mode (trigger reverse-engineering, BNA) and a forward + backward to the
parameters in train mode on a quarter of the batch (training). The two layouts alternate, after
one warm-up each. Also reports the largest difference of the logits between the layouts.
Writes bench/results/layout_<device>.json.
"""
from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bna_gateway.models.network import build_classifier  # noqa: E402
from bna_gateway.models.spec import InputSpec, ModelSpec  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timer(fn: Callable[[], None], device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="resnet18", help="a registry name (resnet18, vgg11, mobilenetv2, ...)")
    ap.add_argument("--width", type=int, default=16, help="the architecture's base width (the demo's: 16)")
    ap.add_argument("--dataset-shape", default="1,28,28", help="C,H,W of the input")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    shape = tuple(int(v) for v in args.dataset_shape.split(","))
    c = shape[0]
    spec = ModelSpec(arch=args.arch, arch_kwargs={"num_classes": args.classes, "in_channels": c, "width": args.width},
                     input=InputSpec(shape=shape, mean=(0.5,) * c, std=(0.25,) * c),
                     class_names=[str(i) for i in range(args.classes)])
    torch.manual_seed(0)
    fast = build_classifier(spec).to(device)
    conv_weight = [p for p in fast.parameters() if p.dim() == 4][-1]  # a 1-channel stem is both
    chosen = "channels_last" if conv_weight.is_contiguous(memory_format=torch.channels_last) else "contiguous"
    plain = copy.deepcopy(fast).to(memory_format=torch.contiguous_format)
    x = torch.rand(args.batch, *shape, device=device)

    def passes(net: torch.nn.Module) -> dict[str, Callable[[], None]]:
        def forward() -> None:
            net.eval()
            with torch.no_grad():
                net(x)

        def input_grad() -> None:
            net.eval()
            for p in net.parameters():
                p.requires_grad_(False)
            xx = x.clone().requires_grad_(True)
            net(xx).logsumexp(1).sum().backward()

        def train_step() -> None:
            net.train()
            for p in net.parameters():
                p.requires_grad_(True)
                p.grad = None
            net(x[: max(1, args.batch // 4)]).logsumexp(1).sum().backward()

        return {"forward": forward, "forward_backward_input": input_grad, "train_step": train_step}

    layouts = {"channels_last": passes(fast), "contiguous": passes(plain)}
    times: dict[str, dict[str, list[float]]] = {lay: {k: [] for k in p} for lay, p in layouts.items()}
    for name in ("forward", "forward_backward_input", "train_step"):
        for lay in layouts:
            layouts[lay][name]()  # warm-up
        for _ in range(args.repeats):
            for lay in layouts:
                times[lay][name].append(_timer(layouts[lay][name], device))
    fast.eval()
    plain.eval()
    with torch.no_grad():
        diff = (fast(x) - plain(x)).abs().max().item()
    result = {
        "arch": args.arch, "width": args.width, "input": list(shape), "batch": args.batch, "device": str(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.processor() or platform.machine(), "build_classifier_layout": chosen,
        "seconds_median": {lay: {k: sorted(v)[len(v) // 2] for k, v in t.items()} for lay, t in times.items()},
        "max_logit_difference": diff,
    }
    result["speedup"] = {k: result["seconds_median"]["contiguous"][k] / result["seconds_median"]["channels_last"][k]
                         for k in times["contiguous"]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"layout_{device.type}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
