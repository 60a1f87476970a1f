"""The models and bundles the peers benchmark measures: the attack lab's, as ``bench/attack_matrix.py`` makes them.

A model directory ``<models>/<run>`` comes from ``bna train`` (mnist5k, resnet18, target 9, the run's attack
and mode); the bundle ``<models>/<run>[_c<N>]_bundle`` (and its detection, ``..._bundle_detection``) from
``bna mitigate`` with the run's trigger family and MAD threshold (``attack_matrix.RUNS``). Both are reused
when present, so ``attack_matrix.py --mitigate`` and this benchmark share them; missing ones are made with
the same commands a user runs.
"""
from __future__ import annotations

import json
import logging
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from attack_matrix import RUNS as ATTACK_MATRIX_RUNS  # bench/ is on sys.path (bench/peers.py runs from there)
from bna_gateway.models.bundle import BundleError, verify_bundle

log = logging.getLogger(__name__)

# run -> (attack, mode, detection's trigger family, MAD threshold): bench/attack_matrix.py's, so both scripts
# build (and reuse) the same model directories and bundles
RUNS = {run: spec for run, spec in ATTACK_MATRIX_RUNS.items() if run != "none"}
TARGET = 9


@dataclass(frozen=True)
class Built:
    path: Path
    built: bool  # made by this run (False: reused)
    seconds: float | None = None  # wall time when built here
    cpu_seconds: float | None = None  # CPU time of the command (all its threads)


def _run(cmd: list[str]) -> tuple[float, float]:
    """Run a command; its wall time and CPU time."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return time.perf_counter() - start, cpu


def _bna() -> list[str]:
    """The ``bna`` command line of this interpreter (``python -m bna_gateway``: no console script needed)."""
    return [sys.executable, "-m", "bna_gateway"]


def bundle_name(run: str, per_class: int) -> str:
    return f"{run}{'' if per_class == 50 else f'_c{per_class}'}_bundle"


def ensure_model(models: Path, run: str, seed: int) -> Built:
    out = models / run
    if (out / "metrics.json").is_file():
        return Built(out, False)
    kind, mode, _, _ = RUNS[run]
    log.info("training %s (bna train) ...", out)
    wall, cpu = _run([*_bna(), "train", "--dataset", "mnist5k", "--arch", "resnet18", "--attack", kind, "--mode", mode,
                      "--target", str(TARGET), "--seed", str(seed), "--out", str(out), "--quiet"])
    return Built(out, True, wall, cpu)


def detection_dir(bundle: Path) -> Path:
    return bundle.parent / f"{bundle.name}_detection"


def ensure_bundle(models: Path, run: str, per_class: int, seed: int, rebuild: bool = False) -> Built:
    """``bna mitigate`` (detection, twins, bundle) unless a verified bundle and its detection are there."""
    bundle = models / bundle_name(run, per_class)
    if not rebuild and (detection_dir(bundle) / "detection.json").is_file():
        try:
            verify_bundle(bundle)
            return Built(bundle, False)
        except BundleError:
            pass
    _, _, family, threshold = RUNS[run]
    log.info("building %s (bna mitigate) ...", bundle)
    wall, cpu = _run([*_bna(), "mitigate", "--model", str(models / run), "--clean-per-class", str(per_class),
                      "--trigger-type", family, "--threshold", str(threshold), "--seed", str(seed),
                      "--out", str(bundle), "--quiet"])
    return Built(bundle, True, wall, cpu)


def bundle_created(bundle: Path) -> str | None:
    try:
        return json.loads((bundle / "manifest.json").read_text()).get("provenance", {}).get("created")
    except (OSError, ValueError):
        return None
