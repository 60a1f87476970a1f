"""``bna mitigate``: detection (unless one is given), one BNA twin per detected target, and the bundle."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from bna_gateway.mitigation.bna import BNAConfig, TwinFit, fit_shared_twin
from bna_gateway.mitigation.bna.stats import require_twin_layers
from bna_gateway.mitigation.detection import DetectionConfig, DetectionResult, TargetTrigger
from bna_gateway.mitigation.detection.io import read_detection, write_detection
from bna_gateway.mitigation.detection.sharding import Sharding
from bna_gateway.mitigation.imagefolder import ImageSet
from bna_gateway.mitigation.jobs.detect import run_detection
from bna_gateway.mitigation.jobs.options import RunOptions
from bna_gateway.mitigation.modeldir import LoadedModel, ModelSource, load_clean_set, load_model
from bna_gateway.models.bundle import DetectionSummary, Manifest, TwinEntry, write_bundle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MitigateOptions:
    source: ModelSource
    out: Path
    detection_file: Path | None = None  # a saved detection (skips detection)
    detection: DetectionConfig = DetectionConfig()
    bna: BNAConfig = BNAConfig()
    run: RunOptions = RunOptions()
    sharding: Sharding = Sharding()  # detection's optimisations in this process, or on Ray (docs/scaling.md)


@dataclass(frozen=True)
class TwinReport:
    """One fitted twin, as the command line reports it."""

    target: int
    sources: list[int]
    fit_classes: list[int]
    alternatives: list[str]
    divergence_before: float  # mean over BN layers
    divergence_after: float
    seconds: float


@dataclass(frozen=True)
class MitigateOutcome:
    bundle: Path
    manifest: Manifest
    detection: DetectionResult
    detection_path: Path | None  # where this run wrote its detection (None: it was given)
    twins: list[TwinReport] = field(default_factory=list)


def mitigate(opts: MitigateOptions) -> MitigateOutcome:
    opts.run.seed_everything()
    model = load_model(opts.source)
    require_twin_layers(model.classifier)  # before detection: its minutes would be spent for nothing
    clean = load_clean_set(model, opts.source, opts.run.seed)
    out = Path(opts.out)
    written = None
    if opts.detection_file is not None:
        detection = read_detection(opts.detection_file)
    else:
        detection = run_detection(model, clean, opts.detection, opts.run, opts.sharding)
        written = write_detection(detection, out.parent / f"{out.name}_detection")
        log.info("detection written to %s", written)
    manifest, twins = build_bundle(model, clean, detection, opts.bna, out, opts.run)
    return MitigateOutcome(out, manifest, detection, written, twins)


def fit_twins(model: LoadedModel, clean: ImageSet, detection: DetectionResult, cfg: BNAConfig, run: RunOptions
              ) -> list[tuple[TargetTrigger, TwinFit]]:
    """One twin per detected target, fitted on every estimate of its trigger; targets that share one stamp
    share one fit, then each refines it (``BNAConfig.share_fits``; ``shared_groups``)."""
    device = run.torch_device
    clf = model.classifier.to(device)
    x, y = clean.x.to(device), clean.y.to(device)
    triggers = detection.triggers
    fits: dict[int, TwinFit] = {}
    for group in shared_groups(triggers) if cfg.share_fits else [[t] for t in sorted(triggers)]:
        if len(group) > 1:
            log.info("targets %s share one stamp: one twin fit for all of them", group)
        variants = [v for t in group for v in triggers[t].variants()]
        aux = {t: triggers[t].fit_classes for t in group}
        sources = {t: triggers[t].sources for t in group}
        fits.update(zip(group, fit_shared_twin(clf, group, x, y, sources, variants, cfg, aux=aux)))
    return [(triggers[t], fits[t]) for t in sorted(triggers)]


def shared_groups(triggers: dict[int, TargetTrigger]) -> list[list[int]]:
    """The targets in groups joined by ``shared_with`` (connected components, either direction), sorted."""
    parent = {t: t for t in triggers}

    def root(t: int) -> int:
        while parent[t] != t:
            t = parent[t]
        return t

    for t, trig in triggers.items():
        for u in trig.shared_with:
            if u in parent:
                parent[root(u)] = root(t)
    groups: dict[int, list[int]] = {}
    for t in sorted(triggers):
        groups.setdefault(root(t), []).append(t)
    return sorted(groups.values())


def build_bundle(model: LoadedModel, clean: ImageSet, detection: DetectionResult, cfg: BNAConfig, out: Path,
                 run: RunOptions) -> tuple[Manifest, list[TwinReport]]:
    """Fit the twins and write the bundle (no twins when nothing was detected)."""
    fits = fit_twins(model, clean, detection, cfg, run)
    entries = [TwinEntry(target=trig.target, file="", sources=trig.sources, flag_rule=fit.stats.flag_rule,
                         flag_threshold=fit.stats.flag_threshold,
                         score=trig.score, divergence_before=fit.divergence_before,
                         divergence_after=fit.divergence_after) for trig, fit in fits]
    reports = [TwinReport(trig.target, trig.sources, trig.fit_classes, sorted(trig.alternatives),
                          _mean(fit.divergence_before), _mean(fit.divergence_after), fit.seconds) for trig, fit in fits]
    summary = DetectionSummary(
        detected_targets=detection.detected_targets,
        sources={str(t): s for t, s in detection.sources.items()},
        scores={str(t): tr.score for t, tr in sorted(detection.triggers.items())},
        threshold=detection.threshold,
        trigger_type=detection.trigger_type or None,
    )
    provenance = {"command": "bna mitigate", "seed": run.seed, "divergence": cfg.divergence, "bna_steps": cfg.steps,
                  "clean_images": len(clean),
                  "source_model": str(model.directory) if model.directory else model.spec.arch}
    manifest = write_bundle(out, model.spec, model.classifier.net.cpu(), [fit.stats for _, fit in fits], summary,
                            entries, provenance)
    return manifest, reports


def _mean(values: dict[str, float]) -> float:
    return sum(values.values()) / len(values) if values else 0.0
