"""The trigger flag's false and true alarms against its margin threshold (docs/method.md#serving-rule).

For each ``MODEL`` directory written by ``bna train`` with a bundle beside it (``MODEL_bundle``, as
``bench/attack_matrix.py --mitigate`` leaves them), and each twin t of that bundle:

- the twin's margin (``models.twins.twin_margin``) on the defender's clean images of t (the set the
  margin is calibrated on, and the twin fitted on) and on the held-out clean images of t;
- for thresholds at several quantiles of the defender's margins: FPR = held-out clean images of t that
  f sends to t and the twin flags, TPR = triggered held-out images that f sends to t and the twin flags
  (over all triggered images, as ``bna evaluate`` counts it).

    python bench/flag_margin.py artifacts/models/blend artifacts/models/wanet

Prints one table per twin and writes ``bench/results/flag_margin.json``.
"""
from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bna_gateway.mitigation.lab.attacks import AttackSpec, build_trigger
from bna_gateway.mitigation.lab.datasets import Dataset, load_ref
from bna_gateway.models.bundle import LoadedBundle, load_bundle
from bna_gateway.models.twins import twin_margin

QUANTILES = (0.0, 0.9, 0.95, 0.98, 1.0)


@dataclass(frozen=True)
class Case:
    """A model's bundle, its reference data and the held-out test images of its attack's victims, triggered."""

    bundle: LoadedBundle
    data: Dataset
    x_trig: torch.Tensor
    y_trig: torch.Tensor


def load_case(model_dir: Path) -> Case:
    bundle = load_bundle(model_dir.parent / f"{model_dir.name}_bundle", "cpu")
    attack = AttackSpec.load(model_dir / "attack.json")
    data = load_ref(bundle.manifest.model.dataset)
    trigger = build_trigger(attack, tuple(bundle.manifest.model.input.shape))
    victims = attack.victims(data.test.y)
    return Case(bundle, data, trigger(data.test.x[victims]), data.test.y[victims])


@torch.no_grad()
def logits(bundle: LoadedBundle, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f's and the twin's logits, 500 images per pass."""
    f = torch.cat([bundle.classifier(x[i : i + 500]) for i in range(0, len(x), 500)])
    g = torch.cat([bundle.router.twin_logits(x[i : i + 500], target) for i in range(0, len(x), 500)])
    return f, g


def margins(bundle: LoadedBundle, x: torch.Tensor, target: int) -> tuple[torch.Tensor, torch.Tensor]:
    """f's labels and the twin's margin away from ``target`` for each image."""
    f, g = logits(bundle, x, target)
    return f.argmax(1), twin_margin(g.softmax(1), target)


def measure(model_dir: Path) -> list[dict]:
    case = load_case(model_dir)
    bundle, data, x_trig = case.bundle, case.data, case.x_trig
    rows = []
    for t in bundle.router.targets:
        f_def, m_def = margins(bundle, data.clean.x[data.clean.y == t], t)
        f_held, m_held = margins(bundle, data.test.x[data.test.y == t], t)
        f_trig, m_trig = margins(bundle, x_trig, t)
        m_def = m_def[f_def == t]
        for q in QUANTILES:
            thr = 0.0 if q == 0 else max(0.0, float(torch.quantile(m_def, q)))
            rows.append({"model": model_dir.name, "target": t, "quantile": q, "threshold": round(thr, 4),
                         "defender_margin_max": round(float(m_def.max()), 4),
                         "fpr_held_out_target": round(float(((f_held == t) & (m_held > thr)).float().mean()), 4),
                         "tpr": round(float(((f_trig == t) & (m_trig > thr)).float().mean()), 4),
                         "f_asr": round(float((f_trig == t).float().mean()), 4),
                         "served_rule": bundle.router.twin_stats[t].flag_rule,
                         "served_threshold": bundle.router.twin_stats[t].flag_threshold})
    return rows


def run(description: str, measure_model: Callable[[Path], list[dict]], out: Path,
        columns: list[tuple[str, str, str]]) -> None:
    """The command line both flag benchmarks share: measure each model directory given, print a Markdown
    table (``columns``: header, row key, format), write the rows as JSON to ``--out``."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("models", nargs="+", type=Path, help="model directories with MODEL_bundle beside them")
    ap.add_argument("--out", type=Path, default=out)
    args = ap.parse_args()
    rows = [r for m in args.models for r in measure_model(m)]
    print("| " + " | ".join(h for h, _, _ in columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join("-" if r[k] is None else format(r[k], f) for _, k, f in columns) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))


def main() -> None:
    run(__doc__.splitlines()[0], measure, Path("bench/results/flag_margin.json"),
        [("model", "model", ""), ("t", "target", ""), ("quantile", "quantile", ".2f"), ("threshold", "threshold", ".3f"),
         ("defender max margin", "defender_margin_max", ".3f"), ("FPR (held-out t)", "fpr_held_out_target", ".3f"),
         ("TPR", "tpr", ".3f"), ("f's ASR", "f_asr", ".3f")])


if __name__ == "__main__":
    main()
