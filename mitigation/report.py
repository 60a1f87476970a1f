"""A Markdown report with PNG figures beside the bundle: metrics, per-layer divergence, one neuron."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from bna_gateway.mitigation.bna.stats import capture_bn_outputs, channel_view  # noqa: E402
from bna_gateway.mitigation.evaluation import Evaluation  # noqa: E402
from bna_gateway.models.bundle import LoadedBundle  # noqa: E402


def _fmt(v: Any) -> str:
    return "-" if v is None else f"{v:.3f}"


def plot_layer_divergence(bundle: LoadedBundle, path: Path) -> str | None:
    twins = [t for t in bundle.manifest.twins if t.divergence_before]
    if not twins:
        return None
    fig, axes = plt.subplots(len(twins), 1, figsize=(10, 3.2 * len(twins)), squeeze=False)
    for ax, twin in zip(axes[:, 0], twins):
        names = list(twin.divergence_before)
        idx = range(len(names))
        ax.bar([i - 0.2 for i in idx], [twin.divergence_before[n] for n in names], 0.4, label="before (f, triggered)")
        ax.bar([i + 0.2 for i in idx], [twin.divergence_after.get(n, 0) for n in names], 0.4, label="after (twin, triggered)")
        ax.set_xticks(list(idx))
        ax.set_xticklabels(names, rotation=70, fontsize=7)
        ax.set_ylabel("mean TV per channel")
        ax.set_title(f"target {twin.target}: divergence from clean activations, per BN layer")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


@torch.no_grad()
def _layer_outputs(model: nn.Module, x: torch.Tensor, layer: str, stats: dict | None = None) -> torch.Tensor:
    got: dict[str, torch.Tensor] = {}

    def sink(name: str, out: torch.Tensor) -> None:
        if name == layer:
            got[name] = channel_view(out)

    with capture_bn_outputs(model, sink, stats):
        model(x)
    return got[layer]


def plot_neuron(bundle: LoadedBundle, target: int, clean: torch.Tensor, trigger: nn.Module, path: Path) -> str | None:
    """The paper's Figure 1: one strongly shifted neuron's activations, clean / triggered / triggered via twin."""
    entry = next((t for t in bundle.manifest.twins if t.target == target), None)
    if entry is None or not entry.divergence_before or len(clean) == 0:
        return None
    layer = max(entry.divergence_before, key=entry.divergence_before.__getitem__)
    model = bundle.classifier
    trig = trigger(clean)
    a_clean = _layer_outputs(model, clean, layer)
    a_trig = _layer_outputs(model, trig, layer)
    stats = bundle.router.twin_stats[target]
    twin_stats = {n: (stats.running_mean[n], stats.running_var[n]) for n in stats.running_mean}
    a_twin = _layer_outputs(model, trig, layer, twin_stats)
    shift = (a_trig.mean(1) - a_clean.mean(1)).abs() / (a_clean.std(1) + 1e-6)
    ch = int(shift.argmax())
    fig, ax = plt.subplots(figsize=(6, 3.5))
    lo = float(min(a_clean[ch].min(), a_trig[ch].min(), a_twin[ch].min()))
    hi = float(max(a_clean[ch].max(), a_trig[ch].max(), a_twin[ch].max()))
    bins = torch.linspace(lo, hi, 60).tolist()
    for a, label, color in ((a_clean, "clean, f", "#5b9bd5"), (a_trig, "triggered, f", "#d9534f"),
                            (a_twin, "triggered, twin", "#5cb85c")):
        ax.hist(a[ch].tolist(), bins=bins, density=True, histtype="step", lw=1.6, label=label, color=color)
    ax.set_yscale("log")
    ax.set_title(f"{layer}, channel {ch} (target {target})", fontsize=9)
    ax.set_xlabel("BN output")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def write_report(out: Path, bundle: LoadedBundle, evaluation: Evaluation | None,
                 neuron_inputs: dict[int, tuple[torch.Tensor, nn.Module]] | None = None,
                 detection_pictures: list[str] | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    m = bundle.manifest
    lines = ["# BNA mitigation report", "",
             f"Bundle `{m.bundle_version}` - architecture `{m.model.arch}`, {m.model.num_classes} classes, "
             f"input {tuple(m.model.input.shape)}.", ""]
    lines += ["## Detection", "", f"Detected targets: {m.detection.detected_targets or 'none'} "
              f"(MAD threshold {_fmt(m.detection.threshold)}, trigger type {m.detection.trigger_type}).", ""]
    for t in m.twins:
        lines.append(f"- target {t.target}: sources {t.sources}, anomaly score {_fmt(t.score)}, "
                     f"flagged when {t.flag_rule} > {t.flag_threshold:.3f}")
    for pic in detection_pictures or []:
        lines += ["", f"![{pic}]({pic})"]
    if evaluation:
        v, mi = evaluation.vanilla, evaluation.mitigated
        lines += ["", "## Metrics (held-out test split)", "", "| model | ACC | ASR | SIA |", "|---|---|---|---|",
                  f"| f (vanilla) | {_fmt(v.acc)} | {_fmt(v.asr)} | {_fmt(v.sia)} |",
                  f"| gateway (f + twins) | {_fmt(mi.acc)} | {_fmt(mi.asr)} | {_fmt(mi.sia)} |", "",
                  f"Trigger detection: TPR {_fmt(evaluation.tpr)} ({_fmt(evaluation.tpr_when_f_fooled)} of the "
                  f"triggered images f gives the target), FPR {_fmt(evaluation.fpr)} (clean images of the "
                  f"detected target classes flagged). DER {_fmt(evaluation.der)}."]
    pic = plot_layer_divergence(bundle, out / "layer_divergence.png")
    if pic:
        lines += ["", "## Divergence per BN layer", "", f"![per-layer divergence]({pic})"]
    for t, (clean, trig) in (neuron_inputs or {}).items():
        pic = plot_neuron(bundle, t, clean, trig, out / f"neuron_target_{t}.png")
        if pic:
            lines += ["", f"## A strongly shifted neuron (target {t})", "",
                      "Activations of clean images, triggered images through f, and triggered images through the "
                      "twin (the paper's Figure 1).", "", f"![neuron]({pic})"]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
