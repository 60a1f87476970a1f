"""``bna demo``: the embedded default, composed from the other jobs, each step skipped when its output exists.

A BadNet-poisoned ``resnet18`` on ``mnist5k`` (target 9), detection (the patch family: the demo's trigger
is a stamped patch), the twin and bundle, the evaluation, the report and sample images. Seeded.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bna_gateway.mitigation.bna import BNAConfig
from bna_gateway.mitigation.detection import DetectionConfig, DetectionResult
from bna_gateway.mitigation.detection.io import read_detection, write_detection
from bna_gateway.mitigation.evaluation import Evaluation, evaluate_bundle
from bna_gateway.mitigation.jobs.detect import run_detection
from bna_gateway.mitigation.jobs.mitigate import build_bundle
from bna_gateway.mitigation.jobs.options import RunOptions
from bna_gateway.mitigation.jobs.train import TrainOptions, train
from bna_gateway.mitigation.lab.attacks import AttackSpec, build_trigger
from bna_gateway.mitigation.lab.datasets import Dataset, load_ref
from bna_gateway.mitigation.modeldir import LoadedModel, ModelSource, load_clean_set, load_model_dir
from bna_gateway.mitigation.report import write_report
from bna_gateway.models.bundle import BundleError, LoadedBundle, load_bundle, verify_bundle

log = logging.getLogger(__name__)
DEMO_ATTACK = AttackSpec(kind="badnet", target=9, mode="a2o", poison_rate=0.1)


@dataclass(frozen=True)
class DemoOptions:
    out: Path = Path("artifacts/demo")
    run: RunOptions = RunOptions()


@dataclass(frozen=True)
class DemoOutcome:
    bundle: Path
    report: Path
    samples: Path
    evaluation: Evaluation
    seconds: dict[str, float] = field(default_factory=dict)  # the steps this run did (not the reused ones)
    total_seconds: float = 0.0


def _step(n: int, what: str) -> None:
    log.info("[%d/5] %s", n, what)


def _model(out: Path, run: RunOptions, times: dict[str, float]) -> LoadedModel:
    model_dir = out / "model"
    if (model_dir / "metrics.json").is_file():
        _step(1, f"model: reusing {model_dir}")
    else:
        _step(1, "training a BadNet-poisoned resnet18 on mnist5k (target 9) ...")
        start = time.perf_counter()
        train(TrainOptions(dataset="mnist5k", out=model_dir, attack=DEMO_ATTACK.model_copy(update={"seed": run.seed}),
                           run=run))
        times["train"] = time.perf_counter() - start
    return load_model_dir(model_dir)


def _detection(out: Path, model: LoadedModel, run: RunOptions, times: dict[str, float]) -> DetectionResult:
    det_dir = out / "detection"
    if (det_dir / "detection.json").is_file():
        _step(2, f"detection: reusing {det_dir}")
        return read_detection(det_dir)
    _step(2, "detecting: trigger reverse-engineering for all 90 class pairs ...")
    start = time.perf_counter()
    cfg = DetectionConfig(trigger_type="patch").with_seed(run.seed, run.progress)
    result = run_detection(model, load_clean_set(model, ModelSource(model_dir=model.directory), run.seed), cfg, run)
    write_detection(result, det_dir)
    times["detect"] = time.perf_counter() - start
    return result


def _bundle(out: Path, model: LoadedModel, detection: DetectionResult, run: RunOptions,
            times: dict[str, float]) -> LoadedBundle:
    bundle_dir = out / "bundle"
    try:
        verify_bundle(bundle_dir)
        _step(3, f"bundle: reusing {bundle_dir}")
    except BundleError:
        _step(3, "fitting BNA twins and writing the bundle ...")
        start = time.perf_counter()
        clean = load_clean_set(model, ModelSource(model_dir=model.directory), run.seed)
        build_bundle(model, clean, detection, BNAConfig(progress=run.progress), bundle_dir, run)
        times["mitigate"] = time.perf_counter() - start
    return load_bundle(bundle_dir, run.torch_device)


def demo(opts: DemoOptions) -> DemoOutcome:
    out, run = Path(opts.out), opts.run
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    times: dict[str, float] = {}
    model = _model(out, run, times)
    detection = _detection(out, model, run, times)
    log.info("detected targets %s, sources %s", detection.detected_targets, detection.sources)
    bundle = _bundle(out, model, detection, run, times)
    assert model.spec.dataset is not None
    data = load_ref(model.spec.dataset)
    eval_path = out / "evaluation.json"
    _step(4, "evaluating on the held-out split ...")
    evaluation = evaluate_bundle(bundle, model.attack or AttackSpec(), data.test)
    eval_path.write_text(json.dumps(evaluation.as_dict(), indent=2))
    _step(5, "report and sample images ...")
    report = _report(out, model, bundle, detection, evaluation, run)
    samples = write_samples(out / "samples", data, model.attack or AttackSpec())
    return DemoOutcome(out / "bundle", report, samples, evaluation, times, time.perf_counter() - start)


def _report(out: Path, model: LoadedModel, bundle: LoadedBundle, detection: DetectionResult, evaluation: Evaluation,
            run: RunOptions) -> Path:
    """The report beside the bundle, with the detection's pictures and the paper's Figure 1 per target."""
    device = run.torch_device
    clean = load_clean_set(model, ModelSource(model_dir=model.directory), run.seed)
    true_trigger = build_trigger(model.attack or AttackSpec(), tuple(model.spec.input.shape)).to(device)
    neuron = {t: (clean.x[torch.isin(clean.y, torch.tensor(trig.sources))].to(device), true_trigger)
              for t, trig in detection.triggers.items()}
    det_dir = out / "detection"
    doc = json.loads((det_dir / "detection.json").read_text())
    pictures = [p for p in doc.get("pictures", []) if (det_dir / p).is_file()]
    (out / "report").mkdir(parents=True, exist_ok=True)
    for p in pictures:
        (out / "report" / p).write_bytes((det_dir / p).read_bytes())
    return write_report(out / "report", bundle, evaluation, neuron, pictures)


def write_samples(folder: Path, data: Dataset, attack: AttackSpec, n_per_class: int = 2) -> Path:
    """PNG samples for trying the gateway: clean test images and triggered non-target ones, named with
    their true class (``clean/clean_00_true0.png``, ``triggered/triggered_00_true3.png``)."""
    trigger = build_trigger(attack, tuple(data.input.shape))
    test = data.test.per_class(n_per_class, seed=1)
    victims = attack.victims(test.y)
    for sub, xs, ys in (("clean", test.x, test.y), ("triggered", trigger(test.x[victims]), test.y[victims])):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for i, (img, label) in enumerate(zip(xs, ys.tolist())):
            arr = (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            arr = arr[:, :, 0] if arr.shape[2] == 1 else arr
            Image.fromarray(np.ascontiguousarray(arr)).save(folder / sub / f"{sub}_{i:02d}_true{label}.png")
    return folder
