"""Implementations of the ``bna`` sub-commands (argument parsing lives in ``cli.py``)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _seed(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)


def cmd_train(args: argparse.Namespace) -> int:
    from bna_gateway.models.network import build_classifier
    from bna_gateway.models.spec import DatasetRef, ModelSpec
    from bna_gateway.mitigation.attacks import AttackSpec, parse_params
    from bna_gateway.mitigation.datasets import load_dataset
    from bna_gateway.mitigation.modeldir import save_model_dir
    from bna_gateway.mitigation.training import TrainConfig, resolve_device, train_classifier

    _seed(args)
    data = load_dataset(args.dataset, args.data_root, args.clean_per_class, args.seed)
    c = data.input.channels
    kwargs: dict = {"num_classes": data.num_classes, "in_channels": c}
    if args.arch in ("resnet18", "preact_resnet18", "vgg16_bn"):
        kwargs["width"] = args.width or (16 if data.input.shape[1] <= 32 else 64)
    elif args.width:
        kwargs["width_mult"] = args.width / 64
    spec = ModelSpec(arch=args.arch, arch_kwargs=kwargs, input=data.input, class_names=data.class_names,
                     dataset=DatasetRef(name=args.dataset, root=args.data_root, clean_per_class=args.clean_per_class,
                                        seed=args.seed))
    attack = AttackSpec(kind=args.attack, params=parse_params(args.attack_param), mode=args.mode, target=args.target,
                        seed=args.seed, poison_rate=args.poison_rate)
    attack.resolved_params()
    if attack.kind != "none" and attack.mode == "a2o" and not 0 <= attack.target < data.num_classes:
        raise ValueError(f"--target {attack.target} is not a class of {args.dataset} (0..{data.num_classes - 1})")
    natural = args.dataset in ("cifar10", "imagefolder")
    cfg = TrainConfig(epochs=args.epochs or (12 if data.input.shape[1] <= 32 else 30), batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, augment=natural, flip=natural,
                      device=str(resolve_device(args.device)), progress=not args.quiet)
    model = build_classifier(spec)
    model, metrics, seconds = train_classifier(model, data, attack, cfg)
    out = Path(args.out)
    save_model_dir(out, spec, model.cpu(), attack, {**metrics.as_dict(), "train_seconds": round(seconds, 1)})
    print(json.dumps({"out": str(out), **metrics.as_dict(), "train_seconds": round(seconds, 1)}))
    return 0


def _detection_config(args: argparse.Namespace):  # noqa: ANN202
    from bna_gateway.mitigation.detection import DetectionConfig
    from bna_gateway.mitigation.detection.reverse import ReverseConfig

    pair = ReverseConfig(seed=args.seed, progress=not args.quiet)
    steps = getattr(args, "detect_steps", None) or getattr(args, "steps", None)  # mitigate / detect
    if steps:
        pair.steps = steps
    return DetectionConfig(trigger_type=args.trigger_type, threshold=args.threshold, pair=pair,
                           statistic=getattr(args, "statistic", "auto"))


def run_detection(args: argparse.Namespace, model, clean):  # noqa: ANN001, ANN201
    from bna_gateway.mitigation.detection import detect_backdoor
    from bna_gateway.mitigation.training import resolve_device

    device = resolve_device(args.device)
    clf = model.classifier.to(device)
    return detect_backdoor(clf, clean.x.to(device), clean.y.to(device), model.spec.num_classes,
                           _detection_config(args))


def cmd_detect(args: argparse.Namespace) -> int:
    from bna_gateway.mitigation.detection.io import scores_table, write_detection
    from bna_gateway.mitigation.modeldir import load_clean_set, resolve_model

    _seed(args)
    model = resolve_model(args)
    clean = load_clean_set(model, args.clean, args.clean_per_class, args.seed)
    result = run_detection(args, model, clean)
    path = write_detection(result, Path(args.out))
    doc = json.loads(path.read_text())
    print(scores_table(doc))
    print(json.dumps({"detected_targets": doc["detected_targets"], "sources": doc["sources"],
                      "seconds": doc["seconds"], "out": str(path)}))
    return 0


def _bna_config(args: argparse.Namespace):  # noqa: ANN202
    from bna_gateway.mitigation.bna import BNAConfig

    cfg = BNAConfig(divergence=args.divergence, progress=not args.quiet)
    if getattr(args, "steps_bna", None):
        cfg.steps = args.steps_bna
    if getattr(args, "lr_bna", None):
        cfg.lr = args.lr_bna
    if getattr(args, "warmup_bna", None) is not None:
        cfg.warmup = args.warmup_bna
    return cfg


def build_bundle(args: argparse.Namespace, model, clean, detection_doc: dict, triggers: dict, out: Path):  # noqa: ANN001, ANN201
    """Fit one twin per detected target and write the bundle (no twins when nothing was detected)."""
    from bna_gateway.models.bundle import DetectionSummary, TwinEntry, write_bundle
    from bna_gateway.mitigation.bna import fit_twin
    from bna_gateway.mitigation.training import resolve_device

    device = resolve_device(args.device)
    clf = model.classifier.to(device)
    x, y = clean.x.to(device), clean.y.to(device)
    cfg = _bna_config(args)
    twins, entries = [], []
    for t, trig in sorted(triggers.items()):
        fit = fit_twin(clf, t, x, y, trig.sources, trig.variants(), cfg, aux=trig.fit_classes)
        twins.append(fit.stats)
        entries.append(TwinEntry(target=t, file="", sources=trig.sources, flag_margin=fit.stats.flag_margin,
                                 score=trig.score, divergence_before=fit.divergence_before,
                                 divergence_after=fit.divergence_after))
        also = f" (fitted also on classes {trig.fit_classes}, which its trigger moves elsewhere)" if trig.fit_classes else ""
        if trig.also:
            also += f" (on its own trigger estimate and its {', '.join(sorted(trig.also))} estimates)"
        print(f"twin for target {t}: sources {trig.sources}{also}, mean divergence "
              f"{sum(fit.divergence_before.values()) / len(fit.divergence_before):.4f} -> "
              f"{sum(fit.divergence_after.values()) / len(fit.divergence_after):.4f} in {fit.seconds:.1f} s")
    summary = DetectionSummary(
        detected_targets=sorted(triggers),
        sources={str(t): tr.sources for t, tr in sorted(triggers.items())},
        scores={str(t): tr.score for t, tr in sorted(triggers.items())},
        threshold=float(detection_doc.get("threshold", 7.0)),
        trigger_type=detection_doc.get("trigger_type"),
    )
    provenance = {"command": "bna mitigate", "seed": args.seed, "divergence": cfg.divergence, "bna_steps": cfg.steps,
                  "clean_images": len(clean), "source_model": str(model.directory) if model.directory else model.spec.arch}
    return write_bundle(out, model.spec, clf.net.cpu(), twins, summary, entries, provenance)


def cmd_mitigate(args: argparse.Namespace) -> int:
    from bna_gateway.mitigation.detection.io import read_triggers, write_detection
    from bna_gateway.mitigation.modeldir import load_clean_set, resolve_model

    _seed(args)
    model = resolve_model(args)
    clean = load_clean_set(model, args.clean, args.clean_per_class, args.seed)
    out = Path(args.out)
    if args.detection:
        doc, triggers = read_triggers(Path(args.detection))
    else:
        result = run_detection(args, model, clean)
        path = write_detection(result, out.parent / f"{out.name}_detection")
        doc, triggers = read_triggers(path)
        print(f"detection written to {path}")
    manifest = build_bundle(args, model, clean, doc, triggers, out)
    print(json.dumps({"bundle": str(out), "bundle_version": manifest.bundle_version,
                      "detected_targets": manifest.detection.detected_targets, "twins": len(manifest.twins)}))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from bna_gateway.models.bundle import load_bundle
    from bna_gateway.mitigation.attacks import AttackSpec
    from bna_gateway.mitigation.datasets import load_ref, read_image_folder
    from bna_gateway.mitigation.evaluation import evaluate_bundle
    from bna_gateway.mitigation.training import resolve_device

    bundle = load_bundle(Path(args.bundle), resolve_device(args.device))
    attack = AttackSpec.load(Path(args.attack))
    spec = bundle.manifest.model
    if args.test:
        c, h, w = spec.input.shape
        test, _, _ = read_image_folder(args.test, channels=c, size=(h, w), class_names=spec.class_names)
    elif spec.dataset is not None:
        test = load_ref(spec.dataset).test
    else:
        raise ValueError("the bundle's model has no dataset on record: pass --test FOLDER")
    doc = evaluate_bundle(bundle, attack, test)
    text = json.dumps(doc, indent=2)
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(text)
    v, m, td = doc["vanilla"], doc["mitigated"], doc["trigger_detection"]
    fmt = lambda d: " / ".join("-" if d[k] is None else f"{d[k]:.3f}" for k in ("acc", "asr", "sia"))  # noqa: E731
    print(f"vanilla   ACC / ASR / SIA: {fmt(v)}")
    print(f"mitigated ACC / ASR / SIA: {fmt(m)}")
    print(f"trigger detection TPR {td['tpr'] if td['tpr'] is None else round(td['tpr'], 3)} "
          f"FPR {td['fpr']:.3f}; detected {doc['detected_targets']} (true {doc['true_targets']}); DER {doc['der']}")
    return 0


def _demo_samples(out: Path, data, attack, n_per_class: int = 2) -> None:  # noqa: ANN001
    """PNG samples for trying the gateway: clean test images and triggered non-target ones."""
    import numpy as np
    from PIL import Image

    from bna_gateway.mitigation.attacks import build_trigger

    trigger = build_trigger(attack, tuple(data.input.shape))
    test = data.test.per_class(n_per_class, seed=1)
    victims = attack.victims(test.y)
    trig = trigger(test.x[victims])
    for sub, xs, ys in (("clean", test.x, test.y), ("triggered", trig, test.y[victims])):
        folder = out / "samples" / sub
        folder.mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(xs, ys.tolist())):
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            arr = arr[:, :, 0] if arr.shape[2] == 1 else arr
            Image.fromarray(np.ascontiguousarray(arr)).save(folder / f"{sub}_{i:02d}_true{label}.png")


def cmd_demo(args: argparse.Namespace) -> int:
    """The embedded default, step by step; each step is skipped when its output already exists."""
    import time

    from bna_gateway.models.bundle import BundleError, load_bundle, verify_bundle
    from bna_gateway.mitigation.attacks import AttackSpec, build_trigger
    from bna_gateway.mitigation.datasets import load_ref
    from bna_gateway.mitigation.detection.io import read_triggers, write_detection
    from bna_gateway.mitigation.evaluation import evaluate_bundle
    from bna_gateway.mitigation.modeldir import load_clean_set, load_model_dir
    from bna_gateway.mitigation.report import write_report
    from bna_gateway.mitigation.training import resolve_device

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    times: dict[str, float] = {}
    model_dir = out / "model"
    if not (model_dir / "metrics.json").is_file():
        print("[1/5] training a BadNet-poisoned resnet18 on mnist5k (target 9) ...", flush=True)
        t = time.perf_counter()
        ns = argparse.Namespace(dataset="mnist5k", data_root=None, arch="resnet18", width=None, attack="badnet",
                                attack_param=[], target=9, mode="a2o", poison_rate=0.1, epochs=None, batch_size=128,
                                lr=0.1, clean_per_class=50, out=str(model_dir), seed=args.seed, device=args.device,
                                quiet=args.quiet, verbose=False)
        cmd_train(ns)
        times["train"] = time.perf_counter() - t
    else:
        print(f"[1/5] model: reusing {model_dir}")
    model = load_model_dir(model_dir)
    clean = load_clean_set(model, None, None, args.seed)
    det_dir = out / "detection"
    # the demo's trigger is a stamped patch, so the patch family alone (half the time of 'both') suffices
    common = dict(seed=args.seed, device=args.device, quiet=args.quiet, trigger_type="patch", threshold=7.0,
                  steps=None, detect_steps=None, divergence="tv", steps_bna=None, lr_bna=None, warmup_bna=None)
    if not (det_dir / "detection.json").is_file():
        print("[2/5] detecting: trigger reverse-engineering for all 90 class pairs ...", flush=True)
        t = time.perf_counter()
        write_detection(run_detection(argparse.Namespace(**common), model, clean), det_dir)
        times["detect"] = time.perf_counter() - t
    else:
        print(f"[2/5] detection: reusing {det_dir}")
    doc, triggers = read_triggers(det_dir)
    print(f"      detected targets {doc['detected_targets']}, sources {doc['sources']}")
    bundle_dir = out / "bundle"
    try:
        verify_bundle(bundle_dir)
        print(f"[3/5] bundle: reusing {bundle_dir}")
    except BundleError:
        print("[3/5] fitting BNA twins and writing the bundle ...", flush=True)
        t = time.perf_counter()
        build_bundle(argparse.Namespace(**common), model, clean, doc, triggers, bundle_dir)
        times["mitigate"] = time.perf_counter() - t
    device = resolve_device(args.device)
    bundle = load_bundle(bundle_dir, device)
    eval_path = out / "evaluation.json"
    if not eval_path.is_file():
        print("[4/5] evaluating on the held-out split ...", flush=True)
        data = load_ref(model.spec.dataset)
        evaluation = evaluate_bundle(bundle, model.attack, data.test)
        eval_path.write_text(json.dumps(evaluation, indent=2))
    else:
        print(f"[4/5] evaluation: reusing {eval_path}")
        data = load_ref(model.spec.dataset)
    evaluation = json.loads(eval_path.read_text())
    print("[5/5] report and sample images ...", flush=True)
    true_trigger = build_trigger(model.attack or AttackSpec(), tuple(model.spec.input.shape)).to(device)
    neuron = {t: (clean.x[torch.isin(clean.y, torch.tensor(trig.sources))].to(device), true_trigger)
              for t, trig in triggers.items()}
    pics = list(doc.get("pictures", []))
    for p in pics:
        src = det_dir / p
        if src.is_file():
            (out / "report").mkdir(parents=True, exist_ok=True)
            (out / "report" / p).write_bytes(src.read_bytes())
    report = write_report(out / "report", bundle, evaluation, neuron, pics)
    _demo_samples(out, data, model.attack or AttackSpec())
    v, m, td = evaluation["vanilla"], evaluation["mitigated"], evaluation["trigger_detection"]
    print(json.dumps({"bundle": str(bundle_dir), "report": str(report), "samples": str(out / "samples"),
                      "vanilla": v, "mitigated": m, "trigger_detection": td,
                      "seconds": {k: round(s, 1) for k, s in times.items()},
                      "total_seconds": round(time.perf_counter() - t0, 1)}, indent=2))
    return 0
