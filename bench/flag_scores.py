"""Which score separates triggered from clean target-class images best: the flag rule's candidates.

For each ``MODEL`` directory with a bundle beside it (``MODEL_bundle``, as ``bench/attack_matrix.py
--mitigate`` leaves them) and each twin t, scores every image f sends to t by

- ``margin``: the served rule's twin margin (``models.twins.twin_margin``, probabilities);
- ``logit_drop``: f's logit of t minus the twin's logit of t (free at serving: both are computed);
- ``kl_f_g``: KL(f's probabilities || the twin's).

The threshold is a quantile of the score over the defender's clean images of t (in the twin's fit set,
as the served margin is calibrated today; unclamped here, while the served margin rule never goes
below 0: bench/flag_margin.py). FPR = held-out clean images of t that f sends to t and the
score flags; TPR = triggered held-out images that f sends to t and the score flags (over all triggered
images, as ``bna evaluate`` counts it, so f's ASR bounds it); "label right" = flagged triggered images
whose best non-target class of the twin is their true class.

    python bench/flag_scores.py artifacts/models/blend artifacts/models/wanet

Prints a table and writes ``bench/results/flag_scores.json``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from bna_gateway.models.twins import twin_margin
from flag_margin import load_case, logits, run  # bench/ is the script's own folder, first on sys.path

QUANTILES = (0.9, 0.95, 0.98, 1.0)


def scores(f: torch.Tensor, g: torch.Tensor, target: int) -> dict[str, torch.Tensor]:
    fp, gp = f.log_softmax(1), g.log_softmax(1)
    return {"margin": twin_margin(gp.exp(), target), "logit_drop": f[:, target] - g[:, target],
            "kl_f_g": (fp.exp() * (fp - gp)).sum(1)}


def measure(model_dir: Path) -> list[dict]:
    case = load_case(model_dir)
    bundle, data, x_trig, y_trig = case.bundle, case.data, case.x_trig, case.y_trig
    rows = []
    for t in bundle.router.targets:
        f_def, g_def = logits(bundle, data.clean.x[data.clean.y == t], t)
        f_held, g_held = logits(bundle, data.test.x[data.test.y == t], t)
        f_trig, g_trig = logits(bundle, x_trig, t)
        s_def, s_held, s_trig = scores(f_def, g_def, t), scores(f_held, g_held, t), scores(f_trig, g_trig, t)
        to_t_def, to_t_held, to_t_trig = (f.argmax(1) == t for f in (f_def, f_held, f_trig))
        other = g_trig.clone()
        other[:, t] = float("-inf")
        label = other.argmax(1)
        for name in s_def:
            for q in QUANTILES:
                thr = float(torch.quantile(s_def[name][to_t_def], q))
                flagged = (s_trig[name] > thr) & to_t_trig
                rows.append({"model": model_dir.name, "target": t, "score": name, "quantile": q,
                             "threshold": round(thr, 4),
                             "fpr_held_out_target": round(float(((s_held[name] > thr) & to_t_held).float().mean()), 4),
                             "tpr": round(float(flagged.float().mean()), 4),
                             "label_right": round(float((label[flagged] == y_trig[flagged]).float().mean()), 4)
                             if flagged.any() else None,
                             "f_asr": round(float(to_t_trig.float().mean()), 4)})
    return rows


def main() -> None:
    run(__doc__.splitlines()[0], measure, Path("bench/results/flag_scores.json"),
        [("model", "model", ""), ("t", "target", ""), ("score", "score", ""), ("quantile", "quantile", ".2f"),
         ("threshold", "threshold", ".3f"), ("FPR (held-out t)", "fpr_held_out_target", ".3f"), ("TPR", "tpr", ".3f"),
         ("label right", "label_right", ".3f"), ("f's ASR", "f_asr", ".3f")])


if __name__ == "__main__":
    main()
