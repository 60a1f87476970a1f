"""Train the attack lab's models on mnist5k, then (``--mitigate``) detect, build the bundle and evaluate.

Usage: python bench/attack_matrix.py [--out artifacts/models] [--runs badnet,chessboard,...]
                                     [--mitigate] [--clean-per-class 50]
Writes artifacts/models/<run>/ (model directories, reused by later runs), with --mitigate
artifacts/models/<run>_bundle/ (+ _bundle_detection/, evaluation JSON), and
bench/results/attack_matrix.json (or attack_matrix_c<N>.json for another clean-set size).
Each step is the CLI a user runs ('bna train', 'bna mitigate', 'bna evaluate'); its wall time is recorded.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from provenance import commit  # bench/ is the script's folder, first on sys.path

RUNS = {  # run -> (attack, mode, detection's trigger family, MAD threshold)
    "none": ("none", "a2o", "all", 7.0),
    "badnet": ("badnet", "a2o", "patch", 7.0),
    "chessboard": ("chessboard", "a2o", "all", 7.0),
    "blend": ("blend", "a2o", "all", 7.0),
    "sig": ("sig", "a2o", "all", 7.0),
    "wanet": ("wanet", "a2o", "all", 7.0),
    "badnet_a2a": ("badnet", "a2a", "patch", 7.0),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="artifacts/models")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mitigate", action="store_true", help="also detect, build the bundle and evaluate")
    ap.add_argument("--clean-per-class", type=int, default=50)
    args = ap.parse_args()
    results = Path("bench/results")
    path = results / f"attack_matrix{_tag(args.clean_per_class)}.json"
    # rows of runs not asked for this time are kept: each row records the commit it was measured at
    rows = json.loads(path.read_text()) if path.is_file() else []
    bna = str(Path(sys.executable).parent / "bna")
    for name in args.runs.split(","):
        kind, mode, family, threshold = RUNS[name]
        out = Path(args.out) / name
        if not (out / "metrics.json").is_file():
            t = time.perf_counter()
            subprocess.run([bna, "train", "--dataset", "mnist5k", "--arch", "resnet18", "--attack", kind, "--mode", mode,
                            "--target", "9", "--seed", str(args.seed), "--out", str(out), "--quiet"], check=True)
            wall = time.perf_counter() - t
        else:
            wall = None
        m = json.loads((out / "metrics.json").read_text())
        row = {"run": name, "attack": kind, "mode": mode, "commit": commit(), **m, "wall_seconds": wall and round(wall, 1)}
        print(f"{name:12s} acc={m['acc']:.3f} asr={m['asr'] if m['asr'] is None else round(m['asr'], 3)} "
              f"sia={m['sia'] if m['sia'] is None else round(m['sia'], 3)} train={m['train_seconds']}s", flush=True)
        if args.mitigate:
            row["mitigation"] = _mitigate(bna, out, family, threshold, args.clean_per_class, args.seed)
        rows = [r for r in rows if r["run"] != name] + [row]
        rows.sort(key=lambda r: list(RUNS).index(r["run"]) if r["run"] in RUNS else len(RUNS))
        results.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rows, indent=2))



def _tag(per_class: int) -> str:
    """File-name suffix of a run with a clean-set size other than the default 50 per class."""
    return "" if per_class == 50 else f"_c{per_class}"


def _mitigate(bna: str, model: Path, family: str, threshold: float, per_class: int, seed: int) -> dict:
    """``bna mitigate`` (detection included) then ``bna evaluate``; the figures the issues ask for."""
    tag = _tag(per_class)
    bundle = model.parent / f"{model.name}{tag}_bundle"
    eval_path = model.parent / f"{model.name}{tag}_evaluation.json"
    t = time.perf_counter()
    subprocess.run([bna, "mitigate", "--model", str(model), "--clean-per-class", str(per_class), "--trigger-type",
                    family, "--threshold", str(threshold), "--seed", str(seed), "--out", str(bundle), "--quiet"],
                   check=True)
    mitigate_s = time.perf_counter() - t
    subprocess.run([bna, "evaluate", "--bundle", str(bundle), "--attack", str(model / "attack.json"), "--json",
                    str(eval_path), "--quiet"], check=True, stdout=subprocess.DEVNULL)
    ev = json.loads(eval_path.read_text())
    det = json.loads((bundle.parent / f"{bundle.name}_detection" / "detection.json").read_text())
    flagged = sorted((p for p in det["pairs"] if p["flagged"]), key=lambda p: -p["score"])
    unflagged = sorted((p for p in det["pairs"] if not p["flagged"]), key=lambda p: -p["score"])
    out = {
        "trigger_type": family, "threshold": threshold, "clean_per_class": per_class,
        "detected_targets": det["detected_targets"], "sources": det["sources"],
        "flagged_pairs": [[p["source"], p["target"], round(p["score"], 2)] for p in flagged],
        "best_unflagged_pairs": [[p["source"], p["target"], round(p["score"], 2)] for p in unflagged[:5]],
        "added_sources": det.get("added_sources", []), "eliminated_pairs": det.get("eliminated_pairs", []),
        "detection_timings": det["timings"], "mitigate_wall_seconds": round(mitigate_s, 1),
        "vanilla": ev["vanilla"], "mitigated": ev["mitigated"], "trigger_detection": ev.get("trigger_detection"),
        "der": ev.get("der"), "outputs_identical_to_f_on_clean": ev.get("outputs_identical_to_f_on_clean"),
        "per_source_class": ev.get("per_source_class"),
    }
    m, v = ev["mitigated"], ev["vanilla"]
    print(f"  detected {det['detected_targets']} sources {det['sources']} | ACC {v['acc']:.3f}->{m['acc']:.3f} "
          f"ASR {v['asr'] if v['asr'] is None else round(v['asr'], 3)}->"
          f"{m['asr'] if m['asr'] is None else round(m['asr'], 3)} SIA {m['sia'] if m['sia'] is None else round(m['sia'], 3)}"
          f" | mitigate {mitigate_s:.0f} s", flush=True)
    return out


if __name__ == "__main__":
    main()
