"""Every setting of the BNA twin fit, with its default and why (docs/method.md#bna)."""
from __future__ import annotations

from dataclasses import dataclass, field

from bna_gateway.models.twins import TwinStats, check_flag_rule

DIVERGENCES = ("tv", "js", "kl")


@dataclass(frozen=True)
class BNAConfig:
    divergence: str = "tv"
    bin_width: float = 0.1
    tau: float = 150.0
    steps: int = 60
    lr: float = 0.08  # full-set Adam steps, fewer than the paper's 10 mini-batch epochs at 0.01: a larger step
    warmup: int = 10  # linear learning-rate warm-up: Adam's first steps move every statistic by ~lr at once
    include_target_clean: bool = True  # clean target-class images in both sets keep their features intact
    layer_weighting: bool = True  # weight each layer by its divergence before fitting
    chunk: int = 512  # images per forward pass
    max_fit_images: int | None = 512  # candidate images per twin fit (more: thinned evenly; None: all of them)
    grid: int | None = 7  # histogram over a fixed ~7x7 grid of positions per feature map (None: all)
    # targets that share one stamp (detection's shared_with: an all-to-all backdoor) share one fit, each with
    # its own flag threshold; False: one fit per target (K fits for an all-to-all backdoor over K classes)
    share_fits: bool = True
    refine_steps: int = 10  # then each target's own fit (its sources first), from the shared statistics
    refine_lr: float = 0.02  # ... with this Adam step and no warm-up (a full step first moves away from the start)
    refine_fit_images: int | None = 256  # ... on at most this many candidate images (thinned as max_fit_images)
    flag_rule: str = "logit_drop"  # serving rule's score (models.twins.flag_score; docs/method.md#serving-rule)
    flag_quantile: float = 1.0  # its threshold: this quantile of the score on clean target images f sends to t
    progress: bool = True

    def __post_init__(self) -> None:
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}: use tv, js or kl")
        if self.steps < 0 or self.warmup < 0 or self.refine_steps < 0 or not self.lr > 0 or not self.refine_lr > 0:
            raise ValueError("BNA steps, refine steps and warm-up must be 0 or more, and both learning rates above 0")
        for name in ("max_fit_images", "refine_fit_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1 (or None for all), got {value}")
        check_flag_rule(self.flag_rule)
        if not 0.0 <= self.flag_quantile <= 1.0:
            raise ValueError(f"flag quantile must lie in [0, 1], got {self.flag_quantile}")


@dataclass(frozen=True)
class TwinFit:
    """A fitted twin and how it got there (per-layer divergences keyed like the twin's statistics)."""

    stats: TwinStats
    divergence_before: dict[str, float]
    divergence_after: dict[str, float]
    divergence_init: dict[str, float]
    loss_history: list[float] = field(default_factory=list)
    seconds: float = 0.0
