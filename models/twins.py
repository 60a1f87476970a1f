"""Twin execution: one copy of the weights, one small set of BatchNorm statistics per target class.

The serving rule, shared by evaluation, the gateway and the offline calibration of the margin:
``y = f(x)``; for images with ``y == t`` (t a detected target) run ``g(x | Theta_t)``; the image is
flagged when the twin's margin away from ``t`` (``twin_margin``) exceeds the twin's calibrated
``flag_margin``, and then the twin's label is returned. docs/method.md#serving-rule.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.func import functional_call

from bna_gateway.models.frozen import freeze, with_buffers
from bna_gateway.models.network import backbone, bn_layers


def twin_margin(twin_probs: torch.Tensor, target: int) -> torch.Tensor:
    """[N] how far the twin moves each image away from ``target``: the largest probability of another
    class minus the target's (positive: the twin prefers another class). The one quantity both the
    serving rule and its calibration on the defender's clean images look at."""
    others = twin_probs.clone()
    others[:, target] = -1.0
    return others.max(dim=1).values - twin_probs[:, target]


@dataclass
class TwinStats:
    """BN running statistics of ``g(.|Theta_t)`` keyed by BN layer name (relative to the network)."""

    target: int
    running_mean: dict[str, torch.Tensor]
    running_var: dict[str, torch.Tensor]
    flag_margin: float = 0.0
    sources: list[int] = field(default_factory=list)

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
            self.flag_margin,
            list(self.sources),
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
            g_probs = self.twin_logits(x[idx], target).softmax(dim=1)
            g_conf, g_label = g_probs.max(dim=1)
            flag = twin_margin(g_probs, target) > self.twin_stats[target].flag_margin
            checked[idx] = True
            flagged[idx] = flag
            label[idx] = torch.where(flag, g_label, original[idx])
            confidence[idx] = torch.where(flag, g_conf, confidence[idx])
        return RoutedBatch(label.cpu(), original.cpu(), checked.cpu(), flagged.cpu(), confidence.cpu())
