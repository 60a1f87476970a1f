"""Train the attack lab's models on mnist5k and report clean ACC / ASR / SIA and training time.

Usage: python bench/attack_matrix.py [--out artifacts/models] [--attacks badnet,chessboard,...]
Writes artifacts/models/<attack>_<mode>/ (model directories, reused by later steps) and
bench/results/attack_matrix.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RUNS = {
    "none": ("none", "a2o"),
    "badnet": ("badnet", "a2o"),
    "chessboard": ("chessboard", "a2o"),
    "blend": ("blend", "a2o"),
    "sig": ("sig", "a2o"),
    "wanet": ("wanet", "a2o"),
    "badnet_a2a": ("badnet", "a2a"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="artifacts/models")
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rows = []
    bna = str(Path(sys.executable).parent / "bna")
    for name in args.runs.split(","):
        kind, mode = RUNS[name]
        out = Path(args.out) / name
        if not (out / "metrics.json").is_file():
            t = time.perf_counter()
            subprocess.run([bna, "train", "--dataset", "mnist5k", "--arch", "resnet18", "--attack", kind, "--mode", mode,
                            "--target", "9", "--seed", str(args.seed), "--out", str(out), "--quiet"], check=True)
            wall = time.perf_counter() - t
        else:
            wall = None
        m = json.loads((out / "metrics.json").read_text())
        rows.append({"run": name, "attack": kind, "mode": mode, **m, "wall_seconds": wall and round(wall, 1)})
        print(f"{name:12s} acc={m['acc']:.3f} asr={m['asr'] if m['asr'] is None else round(m['asr'], 3)} "
              f"sia={m['sia'] if m['sia'] is None else round(m['sia'], 3)} train={m['train_seconds']}s", flush=True)
    Path("bench/results").mkdir(parents=True, exist_ok=True)
    Path("bench/results/attack_matrix.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
