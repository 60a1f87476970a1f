"""``bna detect``: reverse-engineer triggers for every class pair, score them, estimate the targets' triggers."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bna_gateway.mitigation.detection import DetectionConfig, DetectionResult, detect_backdoor
from bna_gateway.mitigation.detection.io import write_detection
from bna_gateway.mitigation.detection.sharding import Sharding, sharded_optimiser
from bna_gateway.mitigation.imagefolder import ImageSet
from bna_gateway.mitigation.jobs.options import RunOptions
from bna_gateway.mitigation.modeldir import LoadedModel, ModelSource, load_clean_set, load_model


@dataclass(frozen=True)
class DetectOptions:
    source: ModelSource
    out: Path
    detection: DetectionConfig = DetectionConfig()
    run: RunOptions = RunOptions()
    sharding: Sharding = Sharding()  # in this process, or on Ray (docs/scaling.md)


@dataclass(frozen=True)
class DetectOutcome:
    result: DetectionResult
    path: Path  # the detection.json written


def run_detection(model: LoadedModel, clean: ImageSet, cfg: DetectionConfig, run: RunOptions,
                  sharding: Sharding = Sharding()) -> DetectionResult:
    """Detection on the model's device (its optimisations sharded as ``sharding`` says); the result in memory."""
    device = run.torch_device
    with sharded_optimiser(sharding, device) as optimiser:
        return detect_backdoor(model.classifier.to(device), clean.x.to(device), clean.y.to(device),
                               model.spec.num_classes, cfg, optimiser=optimiser)


def detect(opts: DetectOptions) -> DetectOutcome:
    opts.run.seed_everything()
    model = load_model(opts.source)
    clean = load_clean_set(model, opts.source, opts.run.seed)
    result = run_detection(model, clean, opts.detection, opts.run, opts.sharding)
    return DetectOutcome(result, write_detection(result, opts.out))
