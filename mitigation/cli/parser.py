"""The ``bna`` argument parser: every sub-command and flag (docs/cli.md documents them)."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Sequence

from bna_gateway.mitigation.detection.config import (DEFAULT_TARGET_THRESHOLD, DEFAULT_THRESHOLD, STATISTICS,
                                                    TRIGGER_TYPES, DetectionConfig, ReverseConfig)
from bna_gateway.mitigation.detection.precision import PRECISIONS


def _number(kind: type, test: Callable[[Any], bool], what: str) -> Callable[[str], Any]:
    """argparse type: a number of ``kind`` that passes ``test`` (``what`` says which)."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value
    return parse


POSITIVE_FLOAT = _number(float, lambda v: v > 0, "greater than 0")
FRACTION = _number(float, lambda v: 0 <= v <= 1, "between 0 and 1")
SHARE = _number(float, lambda v: 0 <= v < 1, "at least 0 and under 1")
NON_NEGATIVE_INT = _number(int, lambda v: v >= 0, "0 or more")
POSITIVE_INT = _number(int, lambda v: v > 0, "1 or more")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="auto, cpu, cuda, cuda:1 ... (default auto: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")


def _add_source(p: argparse.ArgumentParser) -> None:
    """The model under test and the defender's clean images: a model directory, or your own model."""
    p.add_argument("--model", type=Path, help="model directory written by 'bna train'")
    p.add_argument("--clean", type=Path, help="folder of clean images, one sub-folder per class")
    p.add_argument("--clean-per-class", type=POSITIVE_INT, default=None,
                   help="use at most this many clean images per class")
    g = p.add_argument_group("bring your own model (instead of --model DIR)")
    g.add_argument("--arch", help="built-in name or import path 'package.module:factory'")
    g.add_argument("--arch-kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    g.add_argument("--weights", type=Path, help="state dict file (.safetensors, .pt or .pth)")
    g.add_argument("--input-shape", help="C,H,W the model expects, e.g. 3,32,32")
    g.add_argument("--mean", help="per-channel normalisation mean, comma separated (images in [0,1])")
    g.add_argument("--std", help="per-channel normalisation std, comma separated")
    g.add_argument("--class-names", help="comma separated class names (default: the clean folder's sub-folders)")


def _add_detection(p: argparse.ArgumentParser, steps_flag: str) -> None:
    """The detection options 'bna detect' and 'bna mitigate' share."""
    p.add_argument("--trigger-type", choices=TRIGGER_TYPES, default="all",
                   help="trigger families reverse-engineered for every class pair: patch (stamped patches), "
                        "perturbation (additive: blends, sinusoids, noise), warp (smooth image warps: WaNet); "
                        "both = patch and perturbation; all = the three (default)")
    p.add_argument("--threshold", type=POSITIVE_FLOAT, default=DEFAULT_THRESHOLD,
                   help=f"MAD anomaly threshold of a pair (default {DEFAULT_THRESHOLD:g})")
    p.add_argument("--target-threshold", type=POSITIVE_FLOAT, default=DEFAULT_TARGET_THRESHOLD,
                   help="MAD anomaly threshold of a target's column of pair scores against the other targets' "
                        f"(default {DEFAULT_TARGET_THRESHOLD:g})")
    p.add_argument("--min-reach", type=FRACTION, default=DetectionConfig().min_reach,
                   help="keep a target only when its trigger moves at least this fraction of the other classes "
                        "(its sources and the classes it sends elsewhere): a backdoor's trigger moves most, a "
                        f"natural pair's one or two; 0 = off, for source-specific attacks (default "
                        f"{DetectionConfig().min_reach:g})")
    p.add_argument("--memory-share", type=SHARE, default=DetectionConfig().memory_min_share,
                   help="keep a target whose evidence is under "
                        f"{DetectionConfig().memory_exempt_score:g} only when the BatchNorm running statistics "
                        "remember its trigger in at least this share of the training images (a trained backdoor, "
                        "not a natural universal perturbation); 0 = off, for a model whose BN statistics were "
                        f"re-estimated on clean data (default {DetectionConfig().memory_min_share:g})")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="number format of the model's passes during detection: bfloat16 about halves their time "
                        "where the hardware multiplies it natively (CPUs with AVX512-BF16 or AMX, CUDA from "
                        "Ampere); auto = bfloat16 there, float32 elsewhere (default auto; detection.json records "
                        "the one used)")
    p.add_argument("--statistic", choices=STATISTICS, default="auto",
                   help="pair statistic: plain = 1/size (the paper), source = the source's median size / size "
                        "(an easy source is not flagged towards every class); auto = source from 5 classes up")
    p.add_argument(steps_flag, dest="detect_steps", type=POSITIVE_INT, default=None,
                   help=f"detection's optimisation steps per pair, every family (default {ReverseConfig().steps}, "
                        f"the patch family {dict(DetectionConfig().pair_steps).get('patch')})")
    g = p.add_argument_group("sharding detection's optimisations (docs/scaling.md)")
    g.add_argument("--ray", metavar="auto|local|ADDRESS", default=None,
                   help="run the trigger optimisations on Ray actors: auto = the cluster RAY_ADDRESS or a running "
                        "local head names (else a new one here), local = a new one here, or the head's address "
                        "(HOST:6379, ray://HOST:10001); needs pip install 'bna-gateway[ray]'")
    g.add_argument("--ray-workers", type=POSITIVE_INT, default=None,
                   help="Ray actors (default: one per GPU on CUDA, else one per --threads CPUs of the cluster)")
    g.add_argument("--threads", type=POSITIVE_INT, default=None,
                   help="torch CPU threads of every optimisation, here and on each Ray actor (default: this "
                        "process's); runs with the same value give the same detection.json")


def _add_bna(p: argparse.ArgumentParser) -> None:
    p.add_argument("--divergence", choices=["tv", "js", "kl"], default="tv")
    p.add_argument("--steps", dest="bna_steps", type=NON_NEGATIVE_INT, default=None,
                   help="BNA full-set Adam steps (default 60)")
    p.add_argument("--bna-lr", type=POSITIVE_FLOAT, default=None, help="BNA Adam learning rate (default 0.08)")
    p.add_argument("--bna-warmup", type=NON_NEGATIVE_INT, default=None,
                   help="BNA steps of linear learning-rate warm-up (default 10; 0: none)")
    p.add_argument("--refine-steps", type=NON_NEGATIVE_INT, default=None,
                   help="targets sharing one stamp: each target's own steps after the shared fit (default 10)")
    p.add_argument("--refine-images", type=POSITIVE_INT, default=None,
                   help="... on at most this many trigger-embedded and clean images (default 256; the shared fit "
                        "holds 512)")
    p.add_argument("--separate-twins", action="store_true",
                   help="fit every target's twin on its own, also targets that share one stamp (all-to-all: "
                        "K fits instead of one)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bna", description="Backdoor detection and BNA mitigation; the gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a clean or poisoned classifier (the attack lab)")
    p.add_argument("--dataset", required=True, help="mnist5k, digits100, digits8x8, synthetic, cifar10 or imagefolder")
    p.add_argument("--data-root", type=Path, help="folder for cifar10 / imagefolder")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=POSITIVE_INT, default=None, help="width base (resnet18 default 16 on small inputs)")
    p.add_argument("--attack", default="badnet", help="none, badnet, chessboard, single_pixel, blend, sig, wanet")
    p.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="trigger parameter, repeatable (e.g. alpha=0.2, patch_size=3, amplitude=0.02)")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--mode", choices=["a2o", "a2a"], default="a2o")
    p.add_argument("--poison-rate", type=POSITIVE_FLOAT, default=0.1)
    p.add_argument("--epochs", type=POSITIVE_INT, default=None)
    p.add_argument("--batch-size", type=POSITIVE_INT, default=128)
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=0.1)
    p.add_argument("--clean-per-class", type=POSITIVE_INT, default=None,
                   help="defender's clean images per class (default 50; digits100: 20)")
    p.add_argument("--out", type=Path, required=True)
    _add_common(p)

    p = sub.add_parser("detect", help="reverse-engineer triggers for every class pair and run the MAD test")
    _add_source(p)
    _add_detection(p, "--steps")
    p.add_argument("--out", type=Path, required=True)
    _add_common(p)

    p = sub.add_parser("mitigate", help="detect (unless given a detection) and build the BNA twins into a bundle")
    _add_source(p)
    p.add_argument("--detection", type=Path, help="detection.json from 'bna detect' (skips detection)")
    _add_detection(p, "--detect-steps")
    _add_bna(p)
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    _add_common(p)

    p = sub.add_parser("evaluate", help="ACC / ASR / SIA of f and of the gateway's routing, trigger TPR / FPR")
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument("--attack", type=Path, required=True, help="attack.json of the model directory")
    p.add_argument("--test", type=Path, help="folder of test images (class sub-folders) instead of the held-out split")
    p.add_argument("--json", dest="json_out", type=Path, help="write the evaluation JSON here")
    _add_common(p)

    p = sub.add_parser("demo", help="build the embedded default: poisoned model, detection, twins, bundle, samples")
    p.add_argument("--out", type=Path, default=Path("artifacts/demo"))
    _add_common(p)

    p = sub.add_parser("serve", help="run the gateway on a bundle")
    p.add_argument("bundle", nargs="?", default=None, help="bundle directory (default: BNA_BUNDLE)")
    p.add_argument("--host", default=None, help="default from BNA_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default from BNA_PORT or 8000")
    p.add_argument("--workers", type=int, default=None)
    return parser
