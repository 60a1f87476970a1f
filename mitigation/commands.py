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
    from models.network import build_classifier
    from models.spec import DatasetRef, ModelSpec
    from mitigation.attacks import AttackSpec, parse_params
    from mitigation.datasets import load_dataset
    from mitigation.modeldir import save_model_dir
    from mitigation.training import TrainConfig, resolve_device, train_classifier

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
    from mitigation.detection import DetectionConfig
    from mitigation.detection.reverse import ReverseConfig

    pair = ReverseConfig(seed=args.seed, progress=not args.quiet)
    if getattr(args, "steps", None):
        pair.steps = args.steps
    return DetectionConfig(trigger_type=args.trigger_type, threshold=args.threshold, pair=pair)


def run_detection(args: argparse.Namespace, model, clean):  # noqa: ANN001, ANN201
    from mitigation.detection import detect_backdoor
    from mitigation.training import resolve_device

    device = resolve_device(args.device)
    clf = model.classifier.to(device)
    return detect_backdoor(clf, clean.x.to(device), clean.y.to(device), model.spec.num_classes,
                           _detection_config(args))


def cmd_detect(args: argparse.Namespace) -> int:
    from mitigation.detection.io import scores_table, write_detection
    from mitigation.modeldir import load_clean_set, resolve_model

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
    from mitigation.bna import BNAConfig

    cfg = BNAConfig(divergence=args.divergence, progress=not args.quiet)
    if getattr(args, "steps_bna", None):
        cfg.steps = args.steps_bna
    return cfg


def build_bundle(args: argparse.Namespace, model, clean, detection_doc: dict, triggers: dict, out: Path):  # noqa: ANN001, ANN201
    """Fit one twin per detected target and write the bundle (no twins when nothing was detected)."""
    from models.bundle import DetectionSummary, TwinEntry, write_bundle
    from mitigation.bna import fit_twin
    from mitigation.training import resolve_device

    device = resolve_device(args.device)
    clf = model.classifier.to(device)
    x, y = clean.x.to(device), clean.y.to(device)
    cfg = _bna_config(args)
    twins, entries = [], []
    for t, trig in sorted(triggers.items()):
        fit = fit_twin(clf, t, x, y, trig.sources, trig.module(), cfg)
        twins.append(fit.stats)
        entries.append(TwinEntry(target=t, file="", sources=trig.sources, flag_margin=fit.stats.flag_margin,
                                 score=trig.score, divergence_before=fit.divergence_before,
                                 divergence_after=fit.divergence_after))
        print(f"twin for target {t}: sources {trig.sources}, mean divergence "
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
    from mitigation.detection.io import read_triggers, write_detection
    from mitigation.modeldir import load_clean_set, resolve_model

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
    from models.bundle import load_bundle
    from mitigation.attacks import AttackSpec
    from mitigation.datasets import load_ref, read_image_folder
    from mitigation.evaluation import evaluate_bundle
    from mitigation.training import resolve_device

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
