"""Batched pair reverse-engineering versus a per-pair loop of the same objective, on the same model.

Usage:
    python bench/detect_batching.py [--model artifacts/demo/model] [--family patch] [--steps 300]
                                    [--loop-pairs 90] [--device cpu|cuda] [--threads N]
                                    [--precision float32|bfloat16]

The batched run optimises all K(K-1) ordered pairs together (``reverse_engineer`` with every pair as
one group, chunked by ``max_images_per_pass``); the loop calls the very same function once per pair.
Both use the same configuration and the same clean set, so the only difference is batching.
``--loop-pairs N`` times the loop on the first N pairs only and extrapolates linearly to all pairs
(each pair costs the same: same steps, same images), saying so in the output.
Writes bench/results/detect_batching_<device>_<precision>.json.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from dataclasses import replace

import torch

from bna_gateway.mitigation.detection import ReverseConfig
from bna_gateway.mitigation.detection.precision import FORMATS
from bna_gateway.mitigation.detection.reverse import reverse_engineer
from bna_gateway.mitigation.detection.statistic import all_pairs
from bna_gateway.mitigation.modeldir import ModelSource, load_clean_set, load_model_dir
from bna_gateway.mitigation.triggers import family


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="artifacts/demo/model", help="a model directory from 'bna train' or 'bna demo'")
    ap.add_argument("--family", choices=["patch", "perturbation"], default="patch")
    ap.add_argument("--steps", type=int, default=ReverseConfig.steps)
    ap.add_argument("--images-per-pair", type=int, default=ReverseConfig.images_per_group)
    ap.add_argument("--clean-per-class", type=int, default=50)
    ap.add_argument("--loop-pairs", type=int, default=None, help="time the loop on this many pairs (default: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--precision", choices=FORMATS, default="float32",
                    help="number format of the model's passes, both runs (docs/method.md#precision)")
    ap.add_argument("--out", default="bench/results")
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    model_dir = Path(args.model)
    if not (model_dir / "model.json").is_file():
        print(f"no model directory at {model_dir}: run 'make demo-build' (or 'bna train ...') first, "
              "or pass --model DIR", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    loaded = load_model_dir(model_dir)
    model = loaded.classifier.to(device).eval()
    clean = load_clean_set(loaded, ModelSource(model_dir=model_dir, clean_per_class=args.clean_per_class), 0)
    fam = family(args.family)
    x, y = clean.x.to(device), clean.y.to(device)
    k = loaded.spec.num_classes
    pairs = all_pairs(k)
    groups, targets = [[s] for s, _ in pairs], [t for _, t in pairs]
    cfg = ReverseConfig(steps=args.steps, images_per_group=args.images_per_pair, progress=False,
                        precision=args.precision)
    n_loop = min(args.loop_pairs or len(pairs), len(pairs))
    print(f"model {model_dir} ({loaded.spec.arch}, {k} classes, input {tuple(loaded.spec.input.shape)}), "
          f"device {device}, torch threads {torch.get_num_threads()}")
    print(f"{args.family}: {len(pairs)} pairs x {cfg.steps} steps x {cfg.images_per_group} images in {cfg.precision}; "
          f"batched passes hold up to {cfg.max_images_per_pass} images")

    reverse_engineer(model, x, y, groups[:2], targets[:2], fam, replace(cfg, steps=3))  # warm-up (allocator, kernels)
    _sync(device)
    t = time.perf_counter()
    batched = reverse_engineer(model, x, y, groups, targets, fam, cfg)
    _sync(device)
    t_batched = time.perf_counter() - t
    print(f"batched : {t_batched:8.1f} s for {len(pairs)} pairs")

    t = time.perf_counter()
    looped_sizes = []
    for i in range(n_loop):
        r = reverse_engineer(model, x, y, groups[i : i + 1], targets[i : i + 1], fam, cfg)
        looped_sizes.append(float(r.size[0]))
        if (i + 1) % 10 == 0 or i + 1 == n_loop:
            print(f"  loop: {i + 1}/{n_loop} pairs, {time.perf_counter() - t:.1f} s", flush=True)
    _sync(device)
    t_loop_measured = time.perf_counter() - t
    t_loop = t_loop_measured * len(pairs) / n_loop
    note = "" if n_loop == len(pairs) else f" (measured {t_loop_measured:.1f} s on {n_loop} pairs, extrapolated)"
    print(f"per-pair: {t_loop:8.1f} s for {len(pairs)} pairs{note}")
    ratio = t_loop / t_batched
    print(f"speed-up of batching: {ratio:.2f}x")
    found_b = int(torch.isfinite(batched.size[:n_loop]).sum())
    found_l = sum(1 for s in looped_sizes if s != float("inf"))
    print(f"triggers found on the looped pairs: batched {found_b}/{n_loop}, loop {found_l}/{n_loop}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "model": str(model_dir), "family": args.family, "pairs": len(pairs), "steps": cfg.steps,
        "images_per_pair": cfg.images_per_group, "precision": cfg.precision, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch_threads": torch.get_num_threads(), "batched_s": round(t_batched, 2), "loop_s": round(t_loop, 2),
        "loop_pairs_measured": n_loop, "loop_measured_s": round(t_loop_measured, 2), "speedup": round(ratio, 2),
        "found_batched": found_b, "found_loop": found_l, "command": " ".join(sys.argv),
    }
    path = out / f"detect_batching_{device.type}_{cfg.precision}.json"
    path.write_text(json.dumps(doc, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
