"""Every setting of detection, with its default and why (docs/method.md#detection).

``DetectionConfig`` holds the stages' settings; ``ReverseConfig`` the batched trigger optimiser's. Both
are frozen: a stage that needs other settings (the per-target re-estimate) derives its own copy.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from bna_gateway.mitigation.detection.precision import FORMATS, PRECISIONS, resolve_precision
from bna_gateway.mitigation.triggers import FAMILIES, PATCH, PERTURBATION, TriggerFamily

DEFAULT_THRESHOLD = 7.0  # MAD anomaly threshold (with the 1.4826 consistency constant), the paper's
DEFAULT_TARGET_THRESHOLD = 5.0  # the same test on the targets' column evidence (docs/method.md#3-scoring)
TRIGGER_TYPES = (*FAMILIES, "both", "all")
STATISTICS = ("auto", "source", "plain")


def families_for(trigger_type: str) -> tuple[TriggerFamily, ...]:
    """The trigger families a ``--trigger-type`` asks for: one, both (patch and perturbation), or all."""
    if trigger_type == "all":
        return tuple(FAMILIES.values())
    if trigger_type == "both":
        return (PATCH, PERTURBATION)
    if trigger_type not in FAMILIES:
        raise ValueError(f"--trigger-type must be one of {', '.join(TRIGGER_TYPES)}, not {trigger_type!r}")
    return (FAMILIES[trigger_type],)


@dataclass(frozen=True)
class ReverseConfig:
    """The batched reverse-engineering optimiser (Neural Cleanse's objective, one trigger per group)."""

    steps: int = 60
    images_per_group: int = 4
    lr_patch: float = 0.2
    lr_perturbation: float = 0.02
    lr_warp: float = 0.1  # control-point displacement, pixels per step (0.05 left most natural pairs without a warp in 80 steps)
    init_lambda: float = 0.05
    lambda_up: float = 1.5
    lambda_down: float = 1.5 ** 1.5
    patience: int = 5
    success_threshold: float = 0.9
    max_images_per_pass: int = 512
    # a kept trigger's success is measured on at most this many of its group's images (evenly spaced)
    success_images: int = 512
    seed: int = 0
    progress: bool = True
    # perturbation and warp families: scale each kept trigger by the smallest of these factors that makes it
    # succeed on ``success_threshold`` of its whole pool. A minimal perturbation (or warp) sits on the decision
    # boundary of the images it was fitted on; on a pool of several classes it may succeed on only half of
    # them, and comparing such sizes says little. Empty: off (the pair stage); the per-target re-estimate uses it.
    calibrate_scales: tuple[float, ...] = ()
    # early stop: a group that has succeeded and whose kept trigger has not shrunk by ``stop_tolerance``
    # (relative) for ``stop_patience`` steps leaves the batch (0: every group runs every step)
    stop_patience: int = 0
    stop_tolerance: float = 0.01
    # the number format of the model's passes: float32, or bfloat16 under autocast (precision.py; a
    # DetectionConfig's "auto" is resolved to one of these for the device before any pass runs)
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.precision not in FORMATS:
            raise ValueError(f"an optimiser's precision is {' or '.join(FORMATS)}, not {self.precision!r} "
                             "(DetectionConfig.for_device resolves 'auto')")

    def lr(self, family: TriggerFamily) -> float:
        return float(getattr(self, f"lr_{family.name}"))


@dataclass(frozen=True)
class DetectionConfig:
    """Settings of the detection stages (``pipeline.detect_backdoor`` runs them in order)."""

    # patch | perturbation | warp | both (patch and perturbation) | all (the three): the trigger families
    # reverse-engineered for every pair, each judged against its own median
    trigger_type: str = "all"
    threshold: float = DEFAULT_THRESHOLD
    # pair statistic: "plain" = 1 / size (the paper); "source" = (median size of the source's triggers
    # to every class) / size, so that a source that is easy to turn into anything (MNIST's thin "1")
    # does not look backdoored towards every class; "auto" = "source" from 5 classes up (each source
    # then has enough targets for its median), else "plain"
    statistic: str = "auto"
    pair: ReverseConfig = field(default_factory=ReverseConfig)
    # per-family pair-scan steps that differ from ``pair.steps``: a patch mask starts at about 12% of every
    # pixel and needs longer to shrink onto a stamp than a perturbation or a warp to settle (at 60 steps an
    # all-to-all BadNet's pairs were still 23-45 pixels for a 3x3 stamp and none was flagged; at 100, 3.5-5.5)
    pair_steps: tuple[tuple[str, int], ...] = (("patch", 100),)
    # the target scan: one universal trigger per target from all its sources (docs/method.md#1-target-scan-and-pair-scan)
    target: ReverseConfig = field(default_factory=lambda: ReverseConfig(steps=60, images_per_group=10))
    # ... but the target scan's steps look at no more than this many images in all: with many classes each
    # universal trigger draws fewer per step (at least the pair scan's 4), and the scan's cost stops growing
    # with K beyond 60 classes (100 classes: 6 images per target per step)
    target_step_images: int = 600
    # a target whose column of pair scores has a robust z-score above this against the other targets'
    # columns is a candidate even when none of its pairs is flagged
    target_threshold: float = DEFAULT_TARGET_THRESHOLD
    # such a target is kept only when one trigger works for at least this fraction of its sources
    universal_sources: float = 0.5
    # with at least this many classes, the universal triggers' sizes are a test of their own (Neural
    # Cleanse's, against the other targets'); with fewer, the MAD of so few sizes is too unstable
    universal_test_classes: int = 20
    # ... whose own threshold is the pair test's: a universal size is one optimisation, as noisy as a pair's,
    # where a column is a median over many pairs. On digits100 BadNet the natural classes' universal scores
    # reached 6.3 (the backdoor's 10.3); on the clean digits100 model 4.6. The universal score enters a
    # target's score scaled by target_threshold / universal_threshold, so that one threshold decides both
    universal_threshold: float = DEFAULT_THRESHOLD
    # many classes: beyond this many ordered pairs, only each source's ``pairs_per_source`` most likely
    # targets (those whose universal triggers send most of its images there) are scanned as pairs
    max_pairs: int = 500
    pairs_per_source: int = 2
    # a universal trigger's reach (where it sends each class; read by the pair choice above and the transfer)
    # is measured on an equal share per class of about this many clean images, so a trigger's screen costs
    # the same at any K; the pair choice measures ``screen_batch`` triggers a round, the most promising first,
    # and stops when no trigger left could change its choice
    screen_images: int = 1000
    screen_batch: int = 8
    reestimate_steps: int = 150
    reestimate_images: int = 24
    # all-to-all false-pair test: a joint trigger this much larger than the smallest pair's alone (re-estimated
    # with the same settings) means the sources do not all share one trigger; only the smallest pair is kept,
    # with the sources on which its trigger also succeeds (at least ``expand_sources``)
    joint_ratio: float = 2.0
    # re-estimated perturbations are scaled up by the first of these factors that makes them succeed on
    # ReverseConfig.success_threshold of their whole pool (see ReverseConfig.calibrate_scales)
    reestimate_scales: tuple[float, ...] = (1.25, 1.5, 2.0, 2.5, 3.0, 4.0)
    binarise_fraction: float = 0.1  # patch estimate: mask -> 1 where it exceeds this fraction of its max
    # a class joins S(t) when t's re-estimated trigger sends at least this fraction of its clean images
    # to t (None: off). An all-to-one backdoor's trigger works on every class, also on the sources whose
    # pair stayed under the threshold; a natural or all-to-all pair's trigger does not transfer.
    expand_sources: float | None = 0.5
    # reach test: a target is kept only when its trigger moves at least this fraction of the other classes
    # (its sources, and the classes it sends elsewhere); a backdoor's trigger overrides most images, a natural
    # pair's moves one or two look-alike classes (0: off; needs expand_sources, which measures it)
    min_reach: float = 0.5
    # memory test: a target whose trigger evidence is under ``memory_exempt_score`` is kept only when the BN
    # running statistics remember its trigger: the least-squares share of triggered images in the training
    # batches is at least ``memory_min_share`` (0: off). Backdoors poisoned at 10% gave +0.050 to +0.174 on
    # the panel, natural universal perturbations of clean models -0.013 to +0.020 (bench/memory_share.py),
    # with evidence up to 10.5; above the exemption score the evidence stands alone (memory can be erased)
    memory_min_share: float = 0.035
    memory_exempt_score: float = 15.0
    # each of its means is taken over at most this many clean images, evenly spread over the set (a many-class
    # clean set, or many examined targets, would otherwise cost a pass over the whole set per target)
    memory_images: int = 1024
    # a target whose trigger also moves other classes elsewhere (an all-to-all backdoor) has its trigger
    # re-fitted on that whole domain, each class towards where the trigger sends it
    domain_refit: bool = True
    # patch targets whose triggers also work on each other's sources share one stamp: each twin is also
    # fitted on the union of their estimates
    shared_patch: bool = True
    # trigger transfer: a flagged pair's trigger that sends at least this fraction of class c to t' replaces
    # the trigger of (c, t') when smaller (None: off); up to ``transfer_rounds`` rounds
    transfer_success: float | None = 0.5
    transfer_rounds: int = 3
    # the model's passes in float32 or bfloat16; auto = bfloat16 where the device multiplies it natively
    # (about half the time on such a CPU: docs/method.md#precision), else float32
    precision: str = "auto"

    def __post_init__(self) -> None:
        families_for(self.trigger_type)  # refuses an unknown type with the accepted ones
        if self.statistic not in STATISTICS:
            raise ValueError(f"unknown pair statistic {self.statistic!r}: use plain, source or auto")
        if self.universal_threshold <= 0 or self.target_threshold <= 0:
            raise ValueError(f"the target and universal thresholds must be positive, not {self.target_threshold} and "
                             f"{self.universal_threshold}")
        if not 0.0 <= self.min_reach <= 1.0:
            raise ValueError(f"min_reach is a fraction of the classes, between 0 and 1, not {self.min_reach}")
        if not 0.0 <= self.memory_min_share < 1.0:
            raise ValueError(f"memory_min_share is a share of the training images, in [0, 1), not {self.memory_min_share}")
        if self.memory_images < 1:
            raise ValueError(f"memory_images must be at least 1, not {self.memory_images}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.screen_batch < 1 or self.screen_images < 1 or self.target_step_images < 1:
            raise ValueError(f"screen_batch, screen_images and target_step_images must be at least 1, not "
                             f"{self.screen_batch}, {self.screen_images} and {self.target_step_images}")

    @property
    def families(self) -> tuple[TriggerFamily, ...]:
        return families_for(self.trigger_type)

    def target_for(self, num_classes: int) -> ReverseConfig:
        """The target scan's optimiser settings for ``num_classes`` universal triggers (``target_step_images``)."""
        share = max(self.pair.images_per_group, self.target_step_images // max(1, num_classes))
        return replace(self.target, images_per_group=min(self.target.images_per_group, share))

    def pair_for(self, family: TriggerFamily) -> ReverseConfig:
        """The pair scan's optimiser settings for ``family`` (its own step count where ``pair_steps`` has one)."""
        steps = dict(self.pair_steps).get(family.name)
        return self.pair if steps is None else replace(self.pair, steps=steps)

    def with_pair_steps(self, steps: int) -> "DetectionConfig":
        """Every family's pair scan at ``steps`` (``--steps``)."""
        return replace(self, pair=replace(self.pair, steps=steps), pair_steps=())

    def with_seed(self, seed: int, progress: bool = True) -> "DetectionConfig":
        """The same settings with every optimiser seeded by ``seed`` (and progress bars on or off)."""
        return replace(self, pair=replace(self.pair, seed=seed, progress=progress),
                       target=replace(self.target, seed=seed, progress=progress))

    def for_device(self, device: torch.device | str) -> "DetectionConfig":
        """The same settings with ``precision`` resolved for ``device`` and given to every optimiser."""
        precision = resolve_precision(self.precision, device)
        return replace(self, precision=precision, pair=replace(self.pair, precision=precision),
                       target=replace(self.target, precision=precision))

    def reestimate(self) -> ReverseConfig:
        """The optimiser's settings for per-target re-estimates: longer, more images, calibrated."""
        return replace(self.pair, steps=self.reestimate_steps, images_per_group=self.reestimate_images,
                       calibrate_scales=self.reestimate_scales)
