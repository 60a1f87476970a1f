"""How much of each detected target's trigger the network's BatchNorm statistics remember (detection stage 6c).

For every target a panel detection kept, true or not, this prints the memory test's share (the
least-squares share of triggered images in the training batches that the BN running means imply,
``detection.stages.memory.memory_share``) for its final estimate, and the evidence level the test weighs
it against, whether or not the test would have examined it. Run on detections made before the test
existed (``--tag _r15``) it shows what the test separates: the trained backdoors' triggers and the
natural universal perturbations of clean networks.

    PYTHONPATH=bench/panel python bench/memory_share.py --tag _r15

writes ``bench/results/memory_share{tag}.md``. It trains and detects nothing: it reads the models and
detections ``bench/detect_panel.py --tag TAG`` left in ``artifacts/panel``. Other models and detections
are given as pairs (the attack matrix's, the many-class scale run's):

    python bench/memory_share.py --tag _scale --pair artifacts/scale/digits100_badnet_t7=artifacts/scale/digits100_detection
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench" / "panel"))  # the panel's own architectures (module:factory)

from bna_gateway.mitigation.detection import DetectionConfig  # noqa: E402
from bna_gateway.mitigation.detection.io import read_detection  # noqa: E402
from bna_gateway.mitigation.detection.stages.memory import target_level, trigger_shares  # noqa: E402
from bna_gateway.mitigation.detection.suspect import Suspect  # noqa: E402
from bna_gateway.mitigation.modeldir import ModelSource, load_clean_set, load_model  # noqa: E402
from tables import markdown_table, write_result  # noqa: E402  (bench/, the script's folder)

COLUMNS = ("model", "target", "true", "family", "evidence", "share", "test")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--panel", type=Path, default=ROOT / "artifacts" / "panel")
    ap.add_argument("--tag", default="", help="the detection folders' suffix (detect_panel.py --tag)")
    ap.add_argument("--pair", action="append", default=[], metavar="MODEL_DIR=DETECTION_DIR",
                    help="a model directory and its detection, instead of the panel's (repeatable)")
    args = ap.parse_args()
    cfg = DetectionConfig()
    rows = []
    if args.pair:
        runs = [tuple(Path(p) for p in pair.split("=", 1)) for pair in args.pair]
    else:
        runs = [(args.panel / d.name[: -len(f"_detection{args.tag}")], d)
                for d in sorted(args.panel.glob(f"*_detection{args.tag}"))]
    for model_dir, det_dir in runs:
        name = model_dir.name
        if not (det_dir / "detection.json").is_file() or not (model_dir / "model.json").is_file():
            continue
        detection = read_detection(det_dir)
        if not detection.triggers:
            continue
        source = ModelSource(model_dir=model_dir)
        loaded = load_model(source)
        clean = load_clean_set(loaded, source, 0)
        suspect = Suspect(loaded.classifier.eval(), clean.x, clean.y, loaded.spec.num_classes)
        shares = trigger_shares(suspect, detection.triggers, cfg)
        if shares is None:
            print(f"{name}: no BatchNorm running statistics, no memory test")
            continue
        attack = loaded.attack
        poisoned = attack is not None and attack.kind != "none"
        for t, trig in sorted(detection.triggers.items()):
            true = ("a2a" if attack.mode != "a2o" else "yes" if attack.target == t else "no") if poisoned else "no"
            share = shares[t]
            level = target_level(t, trig, detection.target_evidence)
            examined = level < cfg.memory_exempt_score
            verdict = ("kept" if share >= cfg.memory_min_share else "dropped") if examined else "exempt"
            row = {"model": name, "target": str(t), "true": true, "family": trig.family, "evidence": f"{level:.1f}",
                   "share": f"{share:+.3f}", "test": verdict}
            rows.append(row)
            print(" | ".join(row[c] for c in COLUMNS), flush=True)
    table = markdown_table(COLUMNS, rows)
    true = [float(r["share"]) for r in rows if r["true"] == "yes"]
    false = [float(r["share"]) for r in rows if r["true"] == "no"]
    if true and false:
        table += ["", f"All-to-one true targets: share {min(true):+.3f} to {max(true):+.3f} ({len(true)}); "
                      f"targets that are no backdoor's: {min(false):+.3f} to {max(false):+.3f} ({len(false)}); "
                      f"threshold {cfg.memory_min_share:g}, exempt from evidence {cfg.memory_exempt_score:g}."]
    write_result(f"memory_share{args.tag}.md", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
