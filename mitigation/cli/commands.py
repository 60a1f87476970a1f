"""One function per sub-command: parsed flags -> typed options -> the job -> what the user reads.

Results go to stdout (a human-readable summary, then one JSON line a script can parse); progress and
logs go to stderr through ``logging``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bna_gateway.mitigation.bna.config import BNAConfig
from bna_gateway.mitigation.detection.config import DetectionConfig
from bna_gateway.mitigation.detection.sharding import Sharding
from bna_gateway.mitigation.jobs.options import RunOptions
from bna_gateway.mitigation.modeldir import ByoModel, ModelSource


def run_options(args: argparse.Namespace) -> RunOptions:
    return RunOptions(seed=args.seed, device=args.device, progress=not args.quiet)


def _floats(raw: str | None, what: str) -> tuple[float, ...] | None:
    if raw is None:
        return None
    try:
        return tuple(float(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"{what} must be comma-separated numbers, got {raw!r}") from None


def _shape(raw: str | None) -> tuple[int, int, int]:
    if not raw:
        raise ValueError("--arch without --model needs --input-shape C,H,W")
    try:
        shape = tuple(int(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"--input-shape must be C,H,W integers, got {raw!r}") from None
    if len(shape) != 3:
        raise ValueError(f"--input-shape must be C,H,W, got {raw!r}")
    return shape  # type: ignore[return-value]


def model_source(args: argparse.Namespace) -> ModelSource:
    """``--model DIR``, or the bring-your-own flags; with the clean folder and per-class cap."""
    byo = None
    if not args.model and args.arch:
        if not args.weights:
            raise ValueError("--arch without --model needs --weights (a state dict file)")
        try:
            kwargs = json.loads(args.arch_kwargs or "{}")
        except json.JSONDecodeError as exc:
            raise ValueError(f"--arch-kwargs is not a JSON object: {exc}") from None
        if not isinstance(kwargs, dict):
            raise ValueError("--arch-kwargs must be a JSON object, e.g. '{\"width\": 32}'")
        byo = ByoModel(arch=args.arch, weights=args.weights, input_shape=_shape(args.input_shape),
                       mean=_floats(args.mean, "--mean"), std=_floats(args.std, "--std"),
                       class_names=args.class_names.split(",") if args.class_names else None, arch_kwargs=kwargs)
    return ModelSource(model_dir=args.model, byo=byo, clean_dir=args.clean, clean_per_class=args.clean_per_class)


def detection_config(args: argparse.Namespace) -> DetectionConfig:
    cfg = DetectionConfig(trigger_type=args.trigger_type, threshold=args.threshold, statistic=args.statistic,
                          target_threshold=args.target_threshold, min_reach=args.min_reach,
                          memory_min_share=args.memory_share, precision=args.precision
                          ).with_seed(args.seed, not args.quiet)
    if args.detect_steps:
        cfg = cfg.with_pair_steps(args.detect_steps)
    return cfg


def sharding(args: argparse.Namespace) -> Sharding:
    """``--ray``, ``--ray-workers`` and ``--threads``."""
    if args.ray_workers is not None and args.ray is None:
        raise ValueError("--ray-workers needs --ray (auto, local or the head's address)")
    return Sharding(ray=args.ray, workers=args.ray_workers, threads=args.threads)


def bna_config(args: argparse.Namespace) -> BNAConfig:
    given = {"steps": args.bna_steps, "lr": args.bna_lr, "warmup": args.bna_warmup, "refine_steps": args.refine_steps,
             "refine_fit_images": args.refine_images}
    return BNAConfig(divergence=args.divergence, progress=not args.quiet, share_fits=not args.separate_twins,
                     **{k: v for k, v in given.items() if v is not None})


def train(args: argparse.Namespace) -> int:
    from bna_gateway.mitigation.jobs.train import TrainOptions, train as train_job
    from bna_gateway.mitigation.lab.attacks import AttackSpec, parse_params

    attack = AttackSpec(kind=args.attack, params=parse_params(args.attack_param), mode=args.mode, target=args.target,
                        seed=args.seed, poison_rate=args.poison_rate)
    result = train_job(TrainOptions(
        dataset=args.dataset, out=args.out, attack=attack, arch=args.arch, data_root=args.data_root,
        width=args.width, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        clean_per_class=args.clean_per_class, run=run_options(args)))
    print(json.dumps(result.as_dict()))
    return 0


def detect(args: argparse.Namespace) -> int:
    from bna_gateway.mitigation.detection.table import scores_table
    from bna_gateway.mitigation.jobs.detect import DetectOptions, detect as detect_job

    outcome = detect_job(DetectOptions(model_source(args), args.out, detection_config(args), run_options(args),
                                       sharding(args)))
    r = outcome.result
    print(scores_table(r))
    print(json.dumps({"detected_targets": r.detected_targets, "sources": {str(t): s for t, s in r.sources.items()},
                      "seconds": round(r.seconds, 2), "out": str(outcome.path)}))
    return 0


def mitigate(args: argparse.Namespace) -> int:
    from bna_gateway.mitigation.jobs.mitigate import MitigateOptions, mitigate as mitigate_job

    opts = MitigateOptions(model_source(args), args.out, args.detection, detection_config(args), bna_config(args),
                           run_options(args), sharding(args))
    outcome = mitigate_job(opts)
    if outcome.detection_path is not None:
        print(f"detection written to {outcome.detection_path}")
    for tw in outcome.twins:
        notes = f" (fitted also on classes {tw.fit_classes}, which its trigger moves elsewhere)" if tw.fit_classes else ""
        if tw.alternatives:
            notes += f" (on its own trigger estimate and its {', '.join(tw.alternatives)} estimates)"
        print(f"twin for target {tw.target}: sources {tw.sources}{notes}, mean divergence "
              f"{tw.divergence_before:.4f} -> {tw.divergence_after:.4f} in {tw.seconds:.1f} s")
    m = outcome.manifest
    print(json.dumps({"bundle": str(outcome.bundle), "bundle_version": m.bundle_version,
                      "detected_targets": m.detection.detected_targets, "twins": len(m.twins)}))
    return 0


def _metrics_line(name: str, m: object) -> str:
    values = " / ".join("-" if getattr(m, k) is None else f"{getattr(m, k):.3f}" for k in ("acc", "asr", "sia"))
    return f"{name} ACC / ASR / SIA: {values}"


def evaluate(args: argparse.Namespace) -> int:
    from bna_gateway.mitigation.jobs.evaluate import EvaluateOptions, evaluate as evaluate_job

    ev = evaluate_job(EvaluateOptions(args.bundle, args.attack, args.test, run_options(args)))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(ev.as_dict(), indent=2))
    print(_metrics_line("vanilla  ", ev.vanilla))
    print(_metrics_line("mitigated", ev.mitigated))
    tpr = "-" if ev.tpr is None else f"{ev.tpr:.3f}"
    fooled = "-" if ev.tpr_when_f_fooled is None else f"{ev.tpr_when_f_fooled:.3f}"
    print(f"trigger detection TPR {tpr} ({fooled} of the triggered images f gives the target) FPR {ev.fpr:.3f}; "
          f"detected {ev.detected_targets} (true {ev.true_targets}); DER {ev.der}")
    return 0


def demo(args: argparse.Namespace) -> int:
    from bna_gateway.mitigation.jobs.demo import DemoOptions, demo as demo_job

    out = demo_job(DemoOptions(args.out, run_options(args)))
    ev = out.evaluation.as_dict()
    print(json.dumps({"bundle": str(out.bundle), "report": str(out.report), "samples": str(out.samples),
                      "vanilla": ev["vanilla"], "mitigated": ev["mitigated"],
                      "trigger_detection": ev["trigger_detection"],
                      "seconds": {k: round(s, 1) for k, s in out.seconds.items()},
                      "total_seconds": round(out.total_seconds, 1)}, indent=2))
    return 0


def serve(args: argparse.Namespace) -> int:
    from bna_gateway.service.server import run_server

    run_server(args.bundle, host=args.host, port=args.port, workers=args.workers)
    return 0
