"""Pictures a person would rather look at than JSON: anomaly-score histogram and estimated triggers."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from bna_gateway.mitigation.detection.records import DetectionResult  # noqa: E402
from bna_gateway.mitigation.triggers import family, family_of  # noqa: E402


def score_bins(scores: list[float], n: int = 40) -> list[float]:
    """``n`` equal bins over the finite scores, wide enough to be distinct even where every score is the same
    huge number (a degenerate MAD gives scores of 1e14, where numpy's own bins would collapse)."""
    finite = [s for s in scores if math.isfinite(s)] or [0.0]
    lo, hi = min(finite), max(finite)
    pad = max(abs(lo), abs(hi), 1.0) * 1e-3
    if hi - lo < pad:
        lo, hi = lo - pad, hi + pad
    return torch.linspace(lo, hi, n + 1, dtype=torch.float64).tolist()


def _clip(scores: list[float], bins: list[float]) -> list[float]:
    """The scores that are numbers, infinite ones moved onto the outer bin edges."""
    return [min(max(s, bins[0]), bins[-1]) for s in scores if not math.isnan(s)]


def plot_scores(result: DetectionResult, path: Path) -> str:
    fams = sorted({f for p in result.pairs for f in p.by_family})
    fig, axes = plt.subplots(1, len(fams), figsize=(5 * len(fams), 3.5), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        scores = [p.by_family[fam].score for p in result.pairs]
        flagged = [p.by_family[fam].score for p in result.pairs if p.flagged and p.family == fam]
        bins = score_bins(scores)
        ax.hist(_clip(scores, bins), bins=bins, color="#7a9cc6", label="all pairs")
        if flagged:
            ax.hist(_clip(flagged, bins), bins=bins, color="#d9534f", label="flagged")
        ax.axvline(result.threshold, color="k", ls="--", label=f"threshold {result.threshold:g}")
        ax.set_title(f"MAD anomaly score ({fam})")
        ax.set_xlabel("score")
        ax.set_ylabel("pairs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path).name


def _img(t: torch.Tensor):  # noqa: ANN202
    t = t.detach().float().cpu()
    if t.shape[0] == 1:
        return t[0].numpy(), "gray"
    return t.permute(1, 2, 0).clamp(0, 1).numpy(), None


def plot_triggers(result: DetectionResult, out: Path) -> list[str]:
    """One figure per target: a row per estimate (its own first, then its alternatives)."""
    names = []
    for t, tr in result.triggers.items():
        rows = [(tr.family, family(tr.family).panels(tr.tensors))]
        rows += [(name, family_of(ts).panels(ts)) for name, ts in sorted(tr.alternatives.items())]
        cols = max(len(p) for _, p in rows)
        fig, axes = plt.subplots(len(rows), cols, figsize=(3 * cols, 3.2 * len(rows)), squeeze=False)
        for r, (fam, panels) in enumerate(rows):
            for c in range(cols):
                ax = axes[r][c]
                ax.axis("off")
                if c < len(panels):
                    title, img = panels[c]
                    arr, cmap = _img(img)
                    ax.imshow(arr, cmap=cmap, vmin=0, vmax=1 if cmap else None)
                    ax.set_title(f"{fam}: {title}" if len(rows) > 1 else title, fontsize=9)
        fig.suptitle(f"target {t}: sources {tr.sources}, own ASR {tr.asr:.2f}", fontsize=9)
        fig.tight_layout()
        name = f"trigger_target_{t}.png"
        fig.savefig(Path(out) / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names
