"""Twin execution: one copy of the weights, one small set of BatchNorm statistics per target class.

The serving rule, shared by evaluation, the gateway and the offline calibration of its threshold:
``y = f(x)``; for images with ``y == t`` (t a detected target) run ``g(x | Theta_t)``; the image is
flagged when the twin's flag score (``flag_score``: by default the drop of the target's logit from f to
the twin) exceeds the twin's calibrated ``flag_threshold``, and then the twin's best class other than
``t`` is returned. docs/method.md#serving-rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from bna_gateway.models.frozen import freeze, with_buffers
from bna_gateway.models.network import backbone, bn_layers


FLAG_RULES = ("logit_drop", "margin")


def check_flag_rule(rule: str) -> str:
    """``rule`` if it is one of ``FLAG_RULES``; a ValueError naming them otherwise."""
    if rule not in FLAG_RULES:
        raise ValueError(f"unknown flag rule {rule!r}: use one of {', '.join(FLAG_RULES)}")
    return rule


def twin_margin(twin_probs: torch.Tensor, target: int) -> torch.Tensor:
    """[N] how far the twin moves each image away from ``target``: the largest probability of another
    class minus the target's (positive: the twin prefers another class). The ``margin`` rule's score."""
    others = twin_probs.clone()
    others[:, target] = -1.0
    return others.max(dim=1).values - twin_probs[:, target]


def flag_score(rule: str, f_logits: torch.Tensor, g_logits: torch.Tensor, target: int) -> torch.Tensor:
    """[N] the score the serving rule thresholds, for images f assigns to ``target``.

    - ``logit_drop`` (bundles since schema 2): ``f``'s logit of the target minus the twin's. A trigger's
      pull on the target runs through the BN statistics the twin re-fitted, so the twin takes it away;
      on a clean target image the twin's statistics change little and so does the logit.
    - ``margin`` (schema 1 bundles): the twin's ``twin_margin`` (probabilities; ``f`` not used).

    The one quantity both serving and the offline calibration on the defender's clean images look at."""
    if rule == "logit_drop":
        return f_logits[:, target] - g_logits[:, target]
    check_flag_rule(rule)
    return twin_margin(g_logits.softmax(dim=1), target)


@dataclass
class TwinStats:
    """BN running statistics of ``g(.|Theta_t)`` keyed by BN layer name (relative to the network)."""

    target: int
    running_mean: dict[str, torch.Tensor]
    running_var: dict[str, torch.Tensor]
    flag_threshold: float = 0.0  # flag when flag_score(flag_rule, ...) exceeds this
    sources: list[int] = field(default_factory=list)
    flag_rule: str = "margin"  # 'margin' at 0 is the plain "labels differ" rule

    def __post_init__(self) -> None:
        check_flag_rule(self.flag_rule)

    def buffers(self, prefix: str = "") -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for name, m in self.running_mean.items():
            out[f"{prefix}{name}.running_mean"] = m
            out[f"{prefix}{name}.running_var"] = self.running_var[name]
        return out

    def to(self, device: torch.device | str) -> "TwinStats":
        return TwinStats(
            self.target,
            {k: v.to(device) for k, v in self.running_mean.items()},
            {k: v.to(device) for k, v in self.running_var.items()},
            self.flag_threshold,
            list(self.sources),
            self.flag_rule,
        )


@dataclass
class RoutedBatch:
    """Per-image routing outcome (all tensors of length N, on CPU)."""

    label: torch.Tensor
    original_label: torch.Tensor
    checked_by_twin: torch.Tensor
    trigger_detected: torch.Tensor
    confidence: torch.Tensor

    def __len__(self) -> int:
        return int(self.label.numel())


class TwinRouter(nn.Module):
    """Serves ``f`` and its twins; ``forward`` applies the routing rule to a batch."""

    def __init__(self, classifier: nn.Module, twins: list[TwinStats]) -> None:
        super().__init__()
        self.classifier = classifier
        net, self.bn_prefix = backbone(classifier)
        names = set(bn_layers(net))
        self._twins: dict[int, dict[str, torch.Tensor]] = {}
        self.twin_stats: dict[int, TwinStats] = {}
        for twin in twins:
            unknown = set(twin.running_mean) - names
            if unknown:
                raise ValueError(f"twin for class {twin.target} names BN layers the model lacks: {sorted(unknown)[:3]}")
            self.twin_stats[twin.target] = twin
            self._twins[twin.target] = twin.buffers(self.bn_prefix)
        # frozen graphs of f (key None) and of each twin (key: its target), set by freeze_graphs
        self._frozen: dict[int | None, torch.jit.ScriptModule] = {}

    @property
    def targets(self) -> list[int]:
        return sorted(self._twins)

    def to(self, *args, **kwargs):  # type: ignore[override]
        super().to(*args, **kwargs)
        self._frozen = {}  # graphs were frozen for the old device
        device = next(self.classifier.parameters()).device
        for t, stats in list(self.twin_stats.items()):
            self.twin_stats[t] = stats.to(device)
            self._twins[t] = self.twin_stats[t].buffers(self.bn_prefix)
        return self

    def freeze_graphs(self, input_shape: tuple[int, ...]) -> dict[str, str]:
        """Serve f and every twin from frozen TorchScript graphs (``bna_gateway.models.frozen``): same
        outputs, run without the GIL. Each one that cannot be frozen faithfully stays eager; returns those,
        with why (``{"f": reason, "twin 9": reason}``; empty when all froze). The graphs take over at once."""
        device = next(self.classifier.parameters()).device
        results = {None: freeze(self.classifier, input_shape, device)}
        for target, buffers in self._twins.items():
            results[target] = freeze(with_buffers(self.classifier, buffers), input_shape, device)
        self._frozen = {key: r.graph for key, r in results.items() if r.graph is not None}
        return {("f" if key is None else f"twin {key}"): r.reason for key, r in results.items() if r.graph is None}

    @property
    def frozen(self) -> bool:
        """Whether f and every twin run from frozen graphs."""
        return len(self._frozen) == 1 + len(self._twins)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of f."""
        graph = self._frozen.get(None)
        return graph(x) if graph is not None else self.classifier(x)

    def twin_logits(self, x: torch.Tensor, target: int) -> torch.Tensor:
        """Logits of ``g(x | Theta_target)``: the classifier with the twin's BN buffers swapped in."""
        graph = self._frozen.get(target)
        return graph(x) if graph is not None else functional_call(self.classifier, self._twins[target], (x,))

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> RoutedBatch:
        logits = self.logits(x)
        probs = logits.softmax(dim=1)
        confidence, original = probs.max(dim=1)
        label = original.clone()
        checked = torch.zeros_like(original, dtype=torch.bool)
        flagged = torch.zeros_like(checked)
        for target, _ in self._twins.items():  # loop over targets (few), never over images
            idx = (original == target).nonzero(as_tuple=True)[0]
            if idx.numel() == 0:
                continue
            stats = self.twin_stats[target]
            g_logits = self.twin_logits(x[idx], target)
            flag = flag_score(stats.flag_rule, logits[idx], g_logits, target) > stats.flag_threshold
            g_probs = g_logits.softmax(dim=1)
            g_probs[:, target] = -1.0  # a flagged image gets the twin's best class other than the target
            g_conf, g_label = g_probs.max(dim=1)
            checked[idx] = True
            flagged[idx] = flag
            label[idx] = torch.where(flag, g_label, original[idx])
            confidence[idx] = torch.where(flag, g_conf, confidence[idx])
        return RoutedBatch(label.cpu(), original.cpu(), checked.cpu(), flagged.cpu(), confidence.cpu())
