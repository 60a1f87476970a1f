"""The detection panel: does ``bna detect`` find backdoors in models nobody shaped it on?

Trains (once; reused afterwards) a panel of poisoned and clean classifiers on mnist5k -- the four
built-in architectures and two plain CNNs defined outside ``models/`` (``bench/panel/outside_nets.py``,
loaded through ``--arch module:factory``), patch triggers of 2x2 to 5x5 with random, checkerboard and
solid patterns at random or fixed places, blends of noise or an image at alpha 0.1-0.2, SIG, WaNet,
all-to-one towards various targets and all-to-all, several seeds -- then runs the default
``bna detect`` on each and reports:

- detection: all-to-one, the true target found with at least K-2 of its K-1 sources; all-to-all, at
  least 80% of the true (c -> c+1) pairs found; clean, no target at all;
- the false targets, on poisoned models and on clean ones;
- the seconds detection took per model (``detection.json``'s own ``seconds``: the stages, not loading).

Usage: python bench/detect_panel.py [--only NAME,NAME] [--out artifacts/panel] [--detect-arg=--trigger-type=patch]
       python bench/detect_panel.py --report-only   # judge the detections on disk again, rewrite the results
Writes bench/results/detect_panel.json and bench/results/detect_panel.md (after every model); every miss is listed
with its scores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from provenance import commit  # bench/ is the script's folder, first on sys.path

ROOT = Path(__file__).resolve().parents[1]
PANEL_NETS = ROOT / "bench" / "panel"
BNA = str(Path(sys.executable).with_name("bna"))


@dataclass(frozen=True)
class Case:
    name: str
    arch: str
    attack: str = "none"
    params: dict = field(default_factory=dict)
    target: int = 0
    mode: str = "a2o"
    seed: int = 0
    width: int | None = None
    poison_rate: float | None = None  # None: bna train's default (0.1)

    @property
    def poisoned(self) -> bool:
        return self.attack != "none"


CNN5, LENET = "outside_nets:plain_cnn5", "outside_nets:lenet_bn"
IMAGE_PATTERN = "IMAGE"  # replaced by the path of a smooth image written next to the models
PANEL = [
    # patch triggers: sizes 2..5, random / checkerboard / solid patterns, random or fixed places
    Case("resnet_badnet3_t9", "resnet18", "badnet", {"patch_size": 3}, 9),
    Case("resnet_badnet2_t4", "resnet18", "badnet", {"patch_size": 2}, 4, seed=1),
    Case("resnet_badnet5cb_t0", "resnet18", "badnet", {"patch_size": 5, "pattern": "checkerboard",
                                                       "location": "bottom_right"}, 0, seed=2),
    Case("preact_badnet4solid_t7", "preact_resnet18", "badnet", {"patch_size": 4, "pattern": "solid"}, 7, seed=3),
    Case("mobilenet_badnet3_t2", "mobilenetv2", "badnet", {"patch_size": 3}, 2, seed=4, width=16),
    Case("vgg_badnet4cb_t5", "vgg16_bn", "badnet", {"patch_size": 4, "pattern": "checkerboard"}, 5, seed=5, width=16),
    Case("cnn5_badnet4_t3", CNN5, "badnet", {"patch_size": 4}, 3, seed=6),
    Case("lenet_badnet3solid_t8", LENET, "badnet", {"patch_size": 3, "pattern": "solid", "location": [2, 2]}, 8,
         seed=7),
    Case("cnn5_badnet2cb_t6", CNN5, "badnet", {"patch_size": 2, "pattern": "checkerboard"}, 6, seed=8),
    # blends: noise or an image, alpha 0.1-0.2
    Case("resnet_blend20_t1", "resnet18", "blend", {"alpha": 0.2}, 1, seed=9),
    Case("resnet_blend10_t6", "resnet18", "blend", {"alpha": 0.1}, 6, seed=10),
    Case("cnn5_blend15_t2", CNN5, "blend", {"alpha": 0.15}, 2, seed=11),
    Case("preact_blendimg15_t3", "preact_resnet18", "blend", {"alpha": 0.15, "pattern": IMAGE_PATTERN}, 3, seed=12),
    Case("vgg_blend20_t9", "vgg16_bn", "blend", {"alpha": 0.2}, 9, seed=13, width=16),
    # additive and warping triggers
    Case("resnet_sig_t5", "resnet18", "sig", {}, 5, seed=14),
    Case("lenet_sig_t0", LENET, "sig", {}, 0, seed=15),
    Case("resnet_chessboard_t7", "resnet18", "chessboard", {}, 7, seed=16),
    Case("resnet_wanet_t4", "resnet18", "wanet", {}, 4, seed=17),
    Case("preact_wanet_t8", "preact_resnet18", "wanet", {}, 8, seed=18),
    Case("mobilenet_blend20_t7", "mobilenetv2", "blend", {"alpha": 0.2}, 7, seed=19, width=16),
    # all-to-all
    Case("resnet_badnet3_a2a", "resnet18", "badnet", {"patch_size": 3}, 0, mode="a2a", seed=20),
    Case("cnn5_badnet4_a2a", CNN5, "badnet", {"patch_size": 4}, 0, mode="a2a", seed=21),
    # fainter triggers on the small plain CNNs (whose clean seeds have natural universal perturbations)
    Case("cnn5_blend10_t4", CNN5, "blend", {"alpha": 0.1}, 4, seed=40),
    Case("cnn5_badnet2_t7", CNN5, "badnet", {"patch_size": 2}, 7, seed=41),
    Case("cnn5_sig_t1", CNN5, "sig", {}, 1, seed=42),
    Case("cnn5_blendimg10_t5", CNN5, "blend", {"alpha": 0.1, "pattern": IMAGE_PATTERN}, 5, seed=43),
    Case("lenet_blend10_t9", LENET, "blend", {"alpha": 0.1}, 9, seed=44),
    Case("cnn5_wanet_t6", CNN5, "wanet", {}, 6, seed=45),
    Case("cnn5_blend05_t3", CNN5, "blend", {"alpha": 0.05}, 3, seed=46),
    Case("cnn5_blendimg08_t7", CNN5, "blend", {"alpha": 0.08, "pattern": IMAGE_PATTERN}, 7, seed=47),
    Case("cnn5_badnet2solid_t0", CNN5, "badnet", {"patch_size": 2, "pattern": "solid"}, 0, seed=48),
    Case("cnn5_sig_t8", CNN5, "sig", {}, 8, seed=49),
    Case("cnn5_blend10_t9", CNN5, "blend", {"alpha": 0.1}, 9, seed=50),
    # low poisoning rates (3-5% of the training images): the BN statistics remember less of the trigger, the
    # memory test's hard case (docs/method.md#6c-memory-test)
    Case("cnn5_badnet3_p03_t2", CNN5, "badnet", {"patch_size": 3}, 2, seed=51, poison_rate=0.03),
    Case("cnn5_blend10_p03_t6", CNN5, "blend", {"alpha": 0.1}, 6, seed=52, poison_rate=0.03),
    Case("cnn5_sig_p05_t3", CNN5, "sig", {}, 3, seed=53, poison_rate=0.05),
    Case("lenet_blend10_p03_t1", LENET, "blend", {"alpha": 0.1}, 1, seed=54, poison_rate=0.03),
    Case("resnet_blend10_p03_t8", "resnet18", "blend", {"alpha": 0.1}, 8, seed=55, poison_rate=0.03),
    # clean models
    Case("resnet_clean_s0", "resnet18", seed=30),
    Case("resnet_clean_s1", "resnet18", seed=31),
    Case("preact_clean", "preact_resnet18", seed=32),
    Case("mobilenet_clean", "mobilenetv2", seed=33, width=16),
    Case("vgg_clean", "vgg16_bn", seed=34, width=16),
    Case("cnn5_clean", CNN5, seed=35),
    Case("lenet_clean", LENET, seed=36),
    # more seeds of the two small plain CNNs: how often a clean network has a natural universal perturbation
    *(Case(f"cnn5_clean_s{s}", CNN5, seed=s) for s in range(135, 145)),
    *(Case(f"lenet_clean_s{s}", LENET, seed=s) for s in range(136, 139)),
]


def env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(PANEL_NETS), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path}


def image_pattern(out: Path) -> Path:
    """A smooth, structured 28x28 image (not noise) to blend: concentric rings."""
    path = out / "blend_pattern.png"
    if not path.is_file():
        yy, xx = np.mgrid[0:28, 0:28] - 13.5
        rings = (np.sin(np.hypot(xx, yy) / 1.6) + 1) / 2
        Image.fromarray((rings * 255).astype(np.uint8), mode="L").save(path)
    return path


def train(case: Case, out: Path) -> Path:
    model = out / case.name
    if (model / "metrics.json").is_file():
        return model
    cmd = [BNA, "train", "--dataset", "mnist5k", "--arch", case.arch, "--attack", case.attack, "--target",
           str(case.target), "--mode", case.mode, "--seed", str(case.seed), "--out", str(model), "--quiet"]
    if case.width:
        cmd += ["--width", str(case.width)]
    if case.poison_rate is not None:
        cmd += ["--poison-rate", str(case.poison_rate)]
    for key, value in case.params.items():
        value = str(image_pattern(out)) if value == IMAGE_PATTERN else value
        cmd += ["--attack-param", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    subprocess.run(cmd, check=True, env=env())
    return model


def true_pairs(case: Case, k: int = 10) -> set[tuple[int, int]]:
    if not case.poisoned:
        return set()
    if case.mode == "a2a":
        return {(c, (c + 1) % k) for c in range(k)}
    return {(s, case.target) for s in range(k) if s != case.target}


def judge(case: Case, det: dict, k: int = 10) -> dict:
    """Detected or not, by the panel's rule, and the false targets."""
    truth = true_pairs(case, k)
    targets = set(det["detected_targets"])
    sources = {int(t): set(s) for t, s in det["sources"].items()}
    true_targets = {t for _, t in truth}
    found = {(s, t) for t, ss in sources.items() for s in ss} & truth
    if not case.poisoned:
        ok = not targets
    elif case.mode == "a2a":
        ok = len(found) >= 0.8 * len(truth)
    else:
        ok = case.target in targets and len(sources.get(case.target, set()) & {s for s, _ in truth}) >= k - 2
    return {"detected": ok, "true_pairs_found": len(found), "true_pairs": len(truth),
            "false_targets": sorted(targets - true_targets), **found_evidence(det, true_targets)}


def found_evidence(det: dict, true_targets: set[int]) -> dict:
    """The found scores (docs/method.md#3-scoring): the highest on a true target, and the highest on any
    other class, with its family and class."""
    true_best, other = None, (None, "", -1)
    for fam, ev in det.get("targets", {}).items():
        for t, z in enumerate(ev.get("found_score", [])):
            if t in true_targets:
                true_best = z if true_best is None else max(true_best, z)
            elif other[0] is None or z > other[0]:
                other = (z, fam, t)
    return {"found_true": true_best, "found_other": other[0], "found_other_at": f"{other[1]} {other[2]}"}


def evidence(case: Case, det: dict) -> str:
    """What detection saw about the true target(s): for a miss, the scores to look at."""
    truth = true_pairs(case)
    pairs = [p for p in det["pairs"] if (p["source"], p["target"]) in truth]
    best = sorted(pairs, key=lambda p: -p["score"])[:3]
    text = ", ".join(f"{p['source']}->{p['target']} {p['family']} {p['score']:.1f}" for p in best)
    levels = det.get("targets", {})
    if case.poisoned and case.mode == "a2o" and levels:
        text += "; target level " + ", ".join(f"{f} {v['score'][case.target]:.1f}" for f, v in levels.items())
    false = sorted(set(det["detected_targets"]) - {t for _, t in truth}) if case.mode == "a2o" else []
    for t in false:  # a false target: what made it one
        flagged = [p for p in det["pairs"] if p["target"] == t and p["flagged"]]
        trig = det["triggers"][str(t)]
        text += (f"{'; ' if text else ''}false target {t}: {trig['family']}, {len(flagged)} flagged pair(s), "
                 f"{len(trig['sources'])} sources, target level "
                 + ", ".join(f"{f} {v['score'][t]:.1f}" for f, v in levels.items()))
    for m in det.get("memory_checks", []):  # targets the memory test dropped (docs/method.md#6c-memory-test)
        if not m["kept"]:
            text += (f"{'; ' if text else ''}memory test dropped {m['target']} ({m['family']}, evidence "
                     f"{m['level']:.1f}, share {m['share']:+.3f})")
    return text


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "artifacts" / "panel")
    ap.add_argument("--only", default=None, help="comma separated case names")
    ap.add_argument("--detect-arg", action="append", default=[], help="extra 'bna detect' argument, repeatable")
    ap.add_argument("--train-only", action="store_true")
    ap.add_argument("--tag", default="", help="suffix of the result files and detection folders")
    ap.add_argument("--report-only", action="store_true",
                    help="no training or detection: judge the detections already on disk and rewrite the results")
    args = ap.parse_args()
    cases = [c for c in PANEL if not args.only or c.name in args.only.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        t = time.perf_counter()
        if args.report_only and not (args.out / case.name / "metrics.json").is_file():
            continue
        model = train(case, args.out)
        metrics = json.loads((model / "metrics.json").read_text())
        print(f"{case.name:26s} trained: acc {metrics['acc']:.3f} asr {metrics['asr']} ({time.perf_counter() - t:.0f} s)",
              flush=True)
        if args.train_only:
            continue
        det_dir = args.out / f"{case.name}_detection{args.tag}"
        if args.report_only:
            if not (det_dir / "detection.json").is_file():
                continue
        else:
            subprocess.run([BNA, "detect", "--model", str(model), "--out", str(det_dir), "--quiet", *args.detect_arg],
                           check=True, env=env(), stdout=subprocess.DEVNULL)
        det = json.loads((det_dir / "detection.json").read_text())
        dropped = [m["target"] for m in det.get("memory_checks", []) if not m["kept"]]
        row = {**asdict(case), "f_acc": metrics["acc"], "f_asr": metrics["asr"], **judge(case, det),
               "memory_dropped": dropped,
               "detected_targets": det["detected_targets"], "sources": det["sources"],
               "detect_seconds": round(det["seconds"], 1), "evidence": evidence(case, det)}
        rows.append(row)
        print(f"{'':26s} {'OK  ' if row['detected'] else 'MISS'} targets {det['detected_targets']} false "
              f"{row['false_targets']} in {row['detect_seconds']:.0f} s | {row['evidence']}", flush=True)
        report = write_results(rows, args.tag)  # after every case: a stopped run keeps what it measured
    if rows:
        print(report)
    return 0


def write_results(rows: list[dict], tag: str) -> str:
    """bench/results/detect_panel{tag}.json and .md; returns the markdown."""
    poisoned = [r for r in rows if r["attack"] != "none"]
    clean = [r for r in rows if r["attack"] == "none"]
    summary = {
        "poisoned": len(poisoned), "detected": sum(r["detected"] for r in poisoned),
        "clean": len(clean), "clean_with_a_target": sum(not r["detected"] for r in clean),
        "false_targets_on_poisoned": sum(len(r["false_targets"]) for r in poisoned),
        "memory_dropped_clean": sum(len(r.get("memory_dropped", [])) for r in clean),
        "memory_dropped_poisoned": sum(len(r.get("memory_dropped", [])) for r in poisoned),
        "mean_detect_seconds": round(sum(r["detect_seconds"] for r in rows) / len(rows), 1),
        "max_detect_seconds": max(r["detect_seconds"] for r in rows),
        "commit": commit(),
    }
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / f"detect_panel{tag}.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=2))
    lines = ["| model | arch | attack | target | f ACC / ASR | detected | targets found | false targets | s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        attack = r["attack"] + ("" if not r["params"] else " " + ",".join(f"{k}={v}" for k, v in r["params"].items()))
        attack += f" poison={r['poison_rate']:g}" if r.get("poison_rate") is not None else ""
        asr = "-" if r["f_asr"] is None else f"{r['f_asr']:.3f}"
        target = "-" if r["attack"] == "none" else ("a2a" if r["mode"] == "a2a" else str(r["target"]))
        lines.append(f"| {r['name']} | {r['arch'].split(':')[-1]} | {attack} | {target} | {r['f_acc']:.3f} / {asr} | "
                     f"{'yes' if r['detected'] else '**no**'} | {r['detected_targets']} | {r['false_targets'] or '-'} | "
                     f"{r['detect_seconds']:.0f} |")
    misses = [r for r in rows if not r["detected"]]
    lines += ["", f"Poisoned models detected: {summary['detected']} / {summary['poisoned']}; clean models given a "
              f"target: {summary['clean_with_a_target']} / {summary['clean']}; false targets on poisoned models: "
              f"{summary['false_targets_on_poisoned']}; detect seconds mean {summary['mean_detect_seconds']}, "
              f"max {summary['max_detect_seconds']}. Targets the memory test dropped: "
              f"{summary['memory_dropped_clean']} on clean models, {summary['memory_dropped_poisoned']} on poisoned "
              f"ones (" + (", ".join(f"{r['name']} {r['memory_dropped']}" for r in rows if r.get("memory_dropped"))
                           or "none") + ")."]
    others = [r for r in rows if r.get("found_other") is not None]
    if others:
        top = max(others, key=lambda r: r["found_other"])
        trues = [r["found_true"] for r in poisoned if r["mode"] == "a2o" and r.get("found_true") is not None]
        lines += ["", f"Found scores: highest on a class that is not a true target {top['found_other']:.2f} "
                  f"({top['name']}, {top['found_other_at']}); on true targets above 5: "
                  + (", ".join(f"{r['name']} {r['found_true']:.2f}" for r in poisoned if (r.get("found_true") or 0) > 5)
                     or "none") + f" (of {len(trues)} all-to-one models)."]
    if misses:
        lines += ["", "Misses:"] + [f"- {r['name']}: {r['evidence']}" for r in misses]
    (results / f"detect_panel{tag}.md").write_text("\n".join(lines) + "\n")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
