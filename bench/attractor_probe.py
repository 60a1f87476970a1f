"""Signals that might tell a natural attractor from a backdoor, on every target a panel detection kept.

The detection panel's one clean model with a target (cnn5_clean, class 0: one perturbation of size 1.87
sends 97% of every other class to 0) is a *natural* universal perturbation: no statistic over trigger
sizes separates it from the weakest true column-only target. This script measures, for each target a
detection kept (true or not), properties of its trigger estimate that a rule could use:

- ``success``: the estimate's success on its sources' clean images;
- ``margin``: median logit margin of the target on the triggered images f sends there, and on f's clean
  target images (a backdoor might drive the target far past the decision boundary);
- ``feat``: distance of the triggered images' penultimate features from the clean target images'
  centroid, in units of the clean images' mean distance (a backdoor might form its own cluster);
- ``bn max / mean``: total-variation distance between clean and triggered BN-layer histograms (BNA's
  own loss before fitting), the largest layer's and the mean over layers;
- ``proto``: cosine between the mean change the trigger makes and (target mean image - sources' mean
  image) (a natural perturbation might draw the target class);
- ``canvases``: the estimate stamped on content-free images (constant 0, .25, .5, .75, 1; the clean
  set's mean and median image): ``F`` where f already gives the target, ``T`` where the stamped canvas
  goes to the target (a backdoor's trigger might carry the target on its own);
- ``conc``: how concentrated the shift the trigger makes in the BN layers' channels is (ABS's
  compromised neurons: a backdoor acts through a few trigger detectors, a natural perturbation shifts
  many channels a little): per layer, each channel's mean shift over the sources in units of its clean
  standard deviation, and the share of the squared shifts that the top 5% of channels carry; the
  largest share over layers. ``conc z``: the same for the target's universal perturbation (stage 1,
  from every other class) against the other classes' universal perturbations, as a robust z (median,
  MAD x 1.4826): a natural attractor's should look like any other class's.

    PYTHONPATH=bench/panel python bench/attractor_probe.py --tag _r15

writes ``bench/results/attractor_probe{tag}.md``. It trains and detects nothing: it reads the models and
detections ``bench/detect_panel.py --tag TAG`` left in ``artifacts/panel``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "panel"))  # the panel's own architectures (module:factory)

from bna_gateway.mitigation.bna.config import BNAConfig  # noqa: E402
from bna_gateway.mitigation.bna.fit import clean_reference, layer_histograms, per_layer  # noqa: E402
from bna_gateway.mitigation.bna.stats import capture_bn_outputs  # noqa: E402
from bna_gateway.mitigation.detection import DetectionConfig  # noqa: E402
from bna_gateway.mitigation.detection.io import read_detection  # noqa: E402
from bna_gateway.mitigation.detection.records import TargetTrigger  # noqa: E402
from bna_gateway.mitigation.detection.stages.targets import scan_targets  # noqa: E402
from bna_gateway.mitigation.detection.statistic import MAD_CONSISTENCY  # noqa: E402
from bna_gateway.mitigation.detection.suspect import Suspect  # noqa: E402
from bna_gateway.mitigation.modeldir import ModelSource, load_clean_set, load_model  # noqa: E402
from bna_gateway.mitigation.triggers import PERTURBATION, Trigger  # noqa: E402
from tables import markdown_table, write_result  # noqa: E402  (bench/, the script's folder)

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)
COLUMNS = ("model", "target", "true", "family", "success", "margin trig / clean", "feat", "bn max / mean", "proto",
           "canvases 0 .25 .5 .75 1 mean median", "conc", "conc z")


def margins(logits: torch.Tensor, target: int) -> torch.Tensor:
    """The target's logit minus the largest other logit, per image."""
    others = logits.clone()
    others[:, target] = float("-inf")
    return logits[:, target] - others.max(1).values


def penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and the input of the model's last linear layer."""
    last = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    seen: list[torch.Tensor] = []
    handle = last.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].flatten(1)))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, seen[0]


@torch.no_grad()
def channel_means(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every BN layer's per-channel output over ``x``, averaged over positions: {layer: [C, N]}."""
    out: dict[str, torch.Tensor] = {}

    def sink(name: str, a: torch.Tensor) -> None:
        out[name] = (a.flatten(2).mean(2) if a.dim() > 2 else a).T

    with capture_bn_outputs(model, sink):
        model(x)
    return out


def concentration(clean: dict[str, torch.Tensor], stamped: dict[str, torch.Tensor]) -> float:
    """The largest share, over layers, of the squared standardised channel shifts the top 5% carry."""
    best = 0.0
    for name, a in clean.items():
        z = ((stamped[name].mean(1) - a.mean(1)) / (a.std(1) + 1e-6)) ** 2
        top = z.sort(descending=True).values[: max(1, len(z) // 20)]
        best = max(best, float(top.sum() / z.sum().clamp(min=1e-12)))
    return best


def concentration_z(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Each class's universal perturbation's concentration, as a robust z against the other classes'."""
    cfg = DetectionConfig(trigger_type=PERTURBATION.name).with_seed(0, progress=False)
    scan = scan_targets(Suspect(model, x, y, num_classes), cfg)[0][PERTURBATION.name]
    values = []
    for i, t in enumerate(scan.targets):
        xs = x[y != t]
        with torch.no_grad():
            values.append(concentration(channel_means(model, xs),
                                        channel_means(model, Trigger(PERTURBATION, scan.result.one(i))(xs))))
    v = torch.tensor(values)
    out = []
    for i in range(len(values)):
        rest = torch.cat([v[:i], v[i + 1:]])
        med = rest.median()
        mad = (rest - med).abs().median() * MAD_CONSISTENCY
        out.append(float((v[i] - med) / mad.clamp(min=1e-6)))
    return out


@torch.no_grad()
def probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, trig: TargetTrigger) -> dict[str, str]:
    t = trig.target
    xs = x[torch.isin(y, torch.tensor(trig.sources))]
    stamp = trig.module()
    xt = stamp(xs)
    lc, fc = penultimate(model, x)
    lt, ft = penultimate(model, xt)
    hit = lt.argmax(1) == t
    own = (y == t) & (lc.argmax(1) == t)
    centre = fc[own].mean(0)
    spread = (fc[own] - centre).norm(dim=1).mean()
    cfg = BNAConfig(progress=False)
    ref = clean_reference(model, torch.cat([xs, x[y == t]]), cfg)
    div = list(per_layer(ref, layer_histograms(model, xt, ref, cfg), "tv").values())
    change = (xt - xs).mean(0).flatten()
    proto = (x[y == t].mean(0) - xs.mean(0)).flatten()
    canvases = torch.cat([torch.full((1, *x.shape[1:]), v) for v in LEVELS]
                         + [x.mean(0, keepdim=True), x.median(0, keepdim=True).values])
    f_hit = (model(canvases).argmax(1) == t).tolist()
    t_hit = (model(stamp(canvases)).argmax(1) == t).tolist()
    return {
        "success": f"{hit.float().mean():.2f}",
        "margin trig / clean": f"{margins(lt[hit], t).median():.1f} / {margins(lc[own], t).median():.1f}",
        "feat": f"{(ft[hit] - centre).norm(dim=1).mean() / spread:.2f}",
        "bn max / mean": f"{max(div):.2f} / {sum(div) / len(div):.2f}",
        "proto": f"{nn.functional.cosine_similarity(change, proto, 0):.2f}",
        "canvases 0 .25 .5 .75 1 mean median": " ".join(("F" if a else ".") + ("T" if b else ".")
                                                         for a, b in zip(f_hit, t_hit)),
        "conc": f"{concentration(channel_means(model, xs), channel_means(model, xt)):.2f}",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--panel", type=Path, default=ROOT / "artifacts" / "panel")
    ap.add_argument("--tag", default="", help="the detection folders' suffix (detect_panel.py --tag)")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for det_dir in sorted(args.panel.glob(f"*_detection{args.tag}")):
        name = det_dir.name[: -len(f"_detection{args.tag}")]
        if not (det_dir / "detection.json").is_file() or not (args.panel / name / "model.json").is_file():
            continue
        detection = read_detection(det_dir)
        if not detection.triggers:
            continue
        source = ModelSource(model_dir=args.panel / name)
        loaded = load_model(source)
        clean = load_clean_set(loaded, source, 0)
        attack = loaded.attack
        poisoned = attack is not None and attack.kind != "none"
        all_to_all = poisoned and attack.mode != "a2o"
        model = loaded.classifier.eval()
        conc_z = concentration_z(model, clean.x, clean.y, loaded.spec.num_classes)
        for t, trig in sorted(detection.triggers.items()):
            true = "a2a" if all_to_all else ("yes" if poisoned and attack.target == t else "no")
            row = {"model": name, "target": str(t), "true": true, "family": trig.family,
                   **probe(model, clean.x, clean.y, trig), "conc z": f"{conc_z[t]:+.1f}"}
            rows.append(row)
            print(" | ".join(row[c] for c in COLUMNS), flush=True)
    table = markdown_table(COLUMNS, rows)
    write_result(f"attractor_probe{args.tag}.md", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
