"""How detection's cost grows with the number of classes: K = 10 (mnist5k) against K = 100 (digits100).

Usage:
    python bench/detect_scale.py [--device cpu|cuda] [--models artifacts/scale] [--target 7] [--seed 0]
                                 [--train-arg=--epochs=1 ...] [--detect-arg=--trigger-type=patch ...]
                                 [--scale 1.0] [--out bench/results]

For each dataset, trains a BadNet all-to-one resnet18 with ``bna train`` when ``MODELS/<dataset>_badnet_t<T>``
has none yet (``--train-arg`` adds flags), then runs ``bna detect``'s job on it in this process:
the configuration is built from ``bna detect``'s own parser (``--detect-arg`` adds flags, e.g.
``--ray=local``, ``--threads=2``, ``--trigger-type=patch``), the model and clean set are loaded as
``bna detect`` loads them, and the detection.json is written to ``MODELS/<dataset>_detection``. The
seconds of each stage are read from that detection.json's "timings"; the groups each stage optimised
are counted at the optimiser (the one ``detect_backdoor`` calls for every trigger optimisation), which
gives groups per second. ``--scale`` multiplies every optimisation budget (pair, target scan and
re-estimate steps; at least 1 step): for a quick check that the benchmark runs, not for figures.

Prints a table per dataset and the ratio of the detection times, K = 100 over K = 10 (the pairs grow
110x), and writes bench/results/detect_scale.json and detect_scale.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bna_gateway.mitigation.cli.commands import detection_config, sharding
from bna_gateway.mitigation.cli.parser import build_parser
from bna_gateway.mitigation.detection import DetectionConfig, detect_backdoor
from bna_gateway.mitigation.detection.io import write_detection
from bna_gateway.mitigation.detection.reverse import ReverseResult
from bna_gateway.mitigation.detection.sharding import sharded_optimiser
from bna_gateway.mitigation.detection.suspect import Optimiser
from bna_gateway.mitigation.modeldir import ModelSource, load_clean_set, load_model
from bna_gateway.models.device import resolve_device

DATASETS = (("mnist5k", 10), ("digits100", 100))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


@dataclass
class CountingOptimiser:
    """Wraps the optimiser detection runs: the groups and seconds of every call, by its description."""

    inner: Optimiser
    calls: list[tuple[str, int, float]] = field(default_factory=list)

    def __call__(self, *args: Any, desc: str = "reverse", **kwargs: Any) -> ReverseResult:
        groups = args[3] if len(args) > 3 else kwargs["groups"]
        start = time.perf_counter()
        result = self.inner(*args, desc=desc, **kwargs)
        self.calls.append((desc, len(groups), time.perf_counter() - start))
        return result

    def groups_by_stage(self) -> dict[str, int]:
        """Groups per timing key: "targets/patch" -> "targets_patch"; the other calls under "reestimate"."""
        out: dict[str, int] = {}
        for desc, n, _ in self.calls:
            key = desc.replace("/", "_") if desc.split("/")[0] in ("targets", "pairs") else "reestimate"
            out[key] = out.get(key, 0) + n
        return out


def train_if_missing(dataset: str, out: Path, args: argparse.Namespace) -> Path:
    model = out / f"{dataset}_badnet_t{args.target}"
    if (model / "metrics.json").is_file():
        print(f"{dataset}: reusing {model}")
        return model
    cmd = [sys.executable, "-m", "bna_gateway", "train", "--dataset", dataset, "--arch", "resnet18", "--attack",
           "badnet", "--target", str(args.target), "--seed", str(args.seed), "--out", str(model), "--quiet",
           "--device", args.device, *args.train_arg]
    print(f"{dataset}: training ({' '.join(cmd[3:])})", flush=True)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    print(f"{dataset}: trained in {time.perf_counter() - start:.0f} s: {(model / 'metrics.json').read_text()}")
    return model


def scaled(cfg: DetectionConfig, scale: float) -> DetectionConfig:
    if scale == 1.0:
        return cfg
    steps = lambda n: max(1, round(n * scale))  # noqa: E731
    return replace(cfg, pair=replace(cfg.pair, steps=steps(cfg.pair.steps)),
                   target=replace(cfg.target, steps=steps(cfg.target.steps)),
                   pair_steps=tuple((f, steps(n)) for f, n in cfg.pair_steps),
                   reestimate_steps=steps(cfg.reestimate_steps))


def detect(model_dir: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    """``bna detect --model MODEL_DIR --out OUT --device D --seed S --quiet DETECT_ARGS`` in this process."""
    flags = build_parser().parse_args(["detect", "--model", str(model_dir), "--out", str(out), "--device", args.device,
                                       "--seed", str(args.seed), "--quiet", *args.detect_arg])
    cfg = scaled(detection_config(flags), args.scale)
    source = ModelSource(model_dir=model_dir, clean_per_class=flags.clean_per_class)
    torch.manual_seed(args.seed)
    model = load_model(source)
    clean = load_clean_set(model, source, args.seed)
    device = resolve_device(args.device)
    with sharded_optimiser(sharding(flags), device) as inner:
        counter = CountingOptimiser(inner)
        result = detect_backdoor(model.classifier.to(device), clean.x.to(device), clean.y.to(device),
                                 model.spec.num_classes, cfg, optimiser=counter)
    doc = json.loads(write_detection(result, out).read_text())
    return {**summary(doc, counter, model.spec.num_classes, len(clean), args.target),
            "torch_threads": sharding(flags).threads or torch.get_num_threads()}


def summary(doc: dict[str, Any], counter: CountingOptimiser, k: int, clean: int, target: int) -> dict[str, Any]:
    groups = counter.groups_by_stage()
    stages = [{"stage": name, "seconds": s, "groups": groups.get(name),
               "groups_per_second": round(groups[name] / s, 2) if groups.get(name) and s > 0 else None}
              for name, s in doc["timings"].items()]
    opt_groups = sum(n for _, n, _ in counter.calls)
    opt_seconds = sum(s for _, _, s in counter.calls)
    sources = doc["sources"].get(str(target), [])
    return {"classes": k, "clean_images": clean, "seconds": doc["seconds"], "stages": stages,
            "optimiser_groups": opt_groups, "optimiser_seconds": round(opt_seconds, 2),
            "groups_per_second": round(opt_groups / opt_seconds, 2) if opt_seconds else None,
            "detected_targets": doc["detected_targets"], "true_target": target,
            "true_target_sources": f"{len(sources)}/{k - 1}"}


def table(name: str, run: dict[str, Any]) -> list[str]:
    lines = [f"**{name}** (K = {run['classes']}, {run['clean_images']} clean images): detection "
             f"{run['seconds']:.1f} s, {run['optimiser_groups']} groups optimised at "
             f"{run['groups_per_second']} groups/s; detected {run['detected_targets']} "
             f"(true target {run['true_target']} with {run['true_target_sources']} sources)", "",
             "| stage | seconds | groups | groups/s |", "|---|---:|---:|---:|"]
    for st in run["stages"]:
        lines.append(f"| {st['stage']} | {st['seconds']:.1f} | {st['groups'] or '-'} | {st['groups_per_second'] or '-'} |")
    return lines + [""]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", type=Path, default=Path("artifacts/scale"), help="model directories and detections")
    ap.add_argument("--target", type=int, default=7, help="the BadNet target class of both models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train-arg", action="append", default=[], help="extra 'bna train' flag, e.g. --train-arg=--epochs=1")
    ap.add_argument("--detect-arg", action="append", default=[], help="extra 'bna detect' flag, e.g. --detect-arg=--ray=local")
    ap.add_argument("--scale", type=float, default=1.0, help="multiply every optimisation's steps (quick checks)")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()

    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    print(f"device {device} ({name}), torch threads {torch.get_num_threads()}, scale {args.scale}")
    runs = {}
    for dataset, _ in DATASETS:
        model_dir = train_if_missing(dataset, args.models, args)
        runs[dataset] = detect(model_dir, args.models / f"{dataset}_detection", args)
        print("\n".join(table(dataset, runs[dataset])), flush=True)
    ratio = runs["digits100"]["seconds"] / runs["mnist5k"]["seconds"]
    print(f"time(K=100) / time(K=10) = {ratio:.2f} (pairs: 9900 / 90 = 110x)")
    doc = {"device": str(device), "device_name": name, "torch_threads": torch.get_num_threads(), "scale": args.scale,
           "train_args": args.train_arg, "detect_args": args.detect_arg, "runs": runs, "ratio_k100_k10": round(ratio, 2),
           "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "detect_scale.json").write_text(json.dumps(doc, indent=2))
    md = [f"# Detection cost, K = 10 against K = 100 ({device}, {name})", "",
          f"`python {doc['command']}`", ""]
    for dataset, _ in DATASETS:
        md += table(dataset, runs[dataset])
    md.append(f"time(K=100) / time(K=10) = **{ratio:.2f}** (the pairs grow 110x)")
    (args.out / "detect_scale.md").write_text("\n".join(md) + "\n")
    print(f"wrote {args.out / 'detect_scale.json'} and {args.out / 'detect_scale.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
