"""The ``bna`` command line. Sub-commands import their modules lazily, so ``bna serve`` loads no
training code."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence


def _add_byo(p: argparse.ArgumentParser) -> None:
    """Options for bringing your own model instead of a model directory."""
    g = p.add_argument_group("bring your own model (instead of --model DIR)")
    g.add_argument("--arch", help="built-in name or import path 'package.module:factory'")
    g.add_argument("--arch-kwargs", default="{}", help="JSON object of keyword arguments for the factory")
    g.add_argument("--weights", help="state dict file (.safetensors, .pt or .pth)")
    g.add_argument("--input-shape", help="C,H,W the model expects, e.g. 3,32,32")
    g.add_argument("--mean", help="per-channel normalisation mean, comma separated (images in [0,1])")
    g.add_argument("--std", help="per-channel normalisation std, comma separated")
    g.add_argument("--class-names", help="comma separated class names (default: the clean folder's sub-folders)")


def _positive_float(text: str) -> float:
    """argparse type: a float greater than zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def _add_detection(p: argparse.ArgumentParser) -> None:
    """The detection options 'bna detect' and 'bna mitigate' share."""
    p.add_argument("--trigger-type", choices=["patch", "perturbation", "warp", "both", "all"], default="all",
                   help="trigger families reverse-engineered for every class pair: patch (stamped patches), "
                        "perturbation (additive: blends, sinusoids, noise), warp (smooth image warps: WaNet); "
                        "both = patch and perturbation; all = the three (default). Each family costs one "
                        "optimisation over all pairs")
    p.add_argument("--threshold", type=float, default=7.0, help="MAD anomaly threshold (default 7)")
    p.add_argument("--statistic", choices=["auto", "source", "plain"], default="auto",
                   help="pair statistic: plain = 1/size (the paper), source = the source's median size / size "
                        "(an easy source is not flagged towards every class); auto = source from 5 classes up")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bna", description="Backdoor detection and BNA mitigation; the gateway.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a clean or poisoned classifier (the attack lab)")
    p.add_argument("--dataset", required=True, help="mnist5k, digits8x8, synthetic, cifar10 or imagefolder")
    p.add_argument("--data-root", help="folder for cifar10 / imagefolder")
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--width", type=int, default=None, help="width multiplier base (resnet18 default 16 on CPU)")
    p.add_argument("--attack", default="badnet", help="none, badnet, chessboard, single_pixel, blend, sig, wanet")
    p.add_argument("--attack-param", action="append", default=[], metavar="KEY=VALUE",
                   help="trigger parameter, repeatable (e.g. alpha=0.2, patch_size=3, amplitude=0.02)")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--mode", choices=["a2o", "a2a"], default="a2o")
    p.add_argument("--poison-rate", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--clean-per-class", type=int, default=50, help="defender's clean images per class")
    p.add_argument("--out", required=True)
    _add_common(p)

    p = sub.add_parser("detect", help="reverse-engineer triggers for every class pair and run the MAD test")
    p.add_argument("--model", help="model directory written by 'bna train'")
    p.add_argument("--clean", help="folder of clean images, one sub-folder per class")
    p.add_argument("--clean-per-class", type=int, default=None, help="use at most this many clean images per class")
    _add_detection(p)
    p.add_argument("--steps", type=int, default=None, help="optimisation steps per pair")
    p.add_argument("--out", required=True)
    _add_byo(p)
    _add_common(p)

    p = sub.add_parser("mitigate", help="detect (unless given a detection) and build the BNA twins into a bundle")
    p.add_argument("--model", help="model directory written by 'bna train'")
    p.add_argument("--clean", help="folder of clean images, one sub-folder per class")
    p.add_argument("--clean-per-class", type=int, default=None)
    p.add_argument("--detection", help="detection.json from 'bna detect' (skips detection)")
    _add_detection(p)
    p.add_argument("--divergence", choices=["tv", "js", "kl"], default="tv")
    p.add_argument("--steps", dest="steps_bna", type=int, default=None,
                   help="BNA full-set Adam steps (default 60)")
    p.add_argument("--bna-lr", dest="lr_bna", type=_positive_float, default=None,
                   help="BNA Adam learning rate (default 0.08)")
    p.add_argument("--bna-warmup", dest="warmup_bna", type=_non_negative_int, default=None,
                   help="BNA steps of linear learning-rate warm-up (default 10; 0: none)")
    p.add_argument("--detect-steps", dest="detect_steps", type=int, default=None,
                   help="detection's optimisation steps per pair (as 'bna detect --steps')")
    p.add_argument("--out", required=True, help="bundle directory to write")
    _add_byo(p)
    _add_common(p)

    p = sub.add_parser("evaluate", help="ACC / ASR / SIA of f and of the gateway's routing, trigger TPR / FPR")
    p.add_argument("--bundle", required=True)
    p.add_argument("--attack", required=True, help="attack.json of the model directory")
    p.add_argument("--test", help="folder of test images (class sub-folders) instead of the held-out split")
    p.add_argument("--json", dest="json_out", help="write the evaluation JSON here")
    _add_common(p)

    p = sub.add_parser("demo", help="build the embedded default: poisoned model, detection, twins, bundle, samples")
    p.add_argument("--out", default="artifacts/demo")
    _add_common(p)

    p = sub.add_parser("serve", help="run the gateway on a bundle")
    p.add_argument("bundle")
    p.add_argument("--host", default=None, help="default from BNA_HOST or 127.0.0.1")
    p.add_argument("--port", type=int, default=None, help="default from BNA_PORT or 8000")
    p.add_argument("--workers", type=int, default=None)
    return parser


def _handler(command: str) -> Callable[[argparse.Namespace], int]:
    if command == "serve":
        from bna_gateway.service.server import run_server

        def serve(args: argparse.Namespace) -> int:
            run_server(args.bundle, host=args.host, port=args.port, workers=args.workers)
            return 0

        return serve
    from bna_gateway.mitigation import commands

    return getattr(commands, f"cmd_{command}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _handler(args.command)(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError, RuntimeError) as exc:
        if getattr(args, "verbose", False):
            raise
        print(f"bna {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    """The error for the user; a pydantic validation error becomes its messages on one line."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        return "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
    return str(exc)


if __name__ == "__main__":
    sys.exit(main())
