"""Saving and loading a detection: ``detection.json``, ``triggers.safetensors`` and the pictures.

``write_detection`` saves a ``DetectionResult``; ``read_detection`` loads it back as one, so
``bna mitigate --detection FILE`` continues exactly where ``bna detect`` stopped.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from bna_gateway.mitigation.detection.records import (AddedSource, DetectionResult, DomainRefit, Elimination,
                                                      MemoryCheck, NarrowTrigger, PairRecord, TargetEvidence,
                                                      TargetTrigger, Transfer)

DETECTION_JSON = "detection.json"
TRIGGERS_FILE = "triggers.safetensors"
ALSO = "also"  # key "<target>.also.<name>.<tensor>": TargetTrigger.alternatives


def write_detection(result: DetectionResult, out: Path, pictures: bool = True) -> Path:
    """``out/detection.json`` (+ the trigger tensors and, with ``pictures``, the figures); its path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{t}.{k}": v.contiguous().float() for t, tr in result.triggers.items() for k, v in tr.tensors.items()}
    tensors.update({f"{t}.{ALSO}.{name}.{k}": v.contiguous().float() for t, tr in result.triggers.items()
                    for name, ts in tr.alternatives.items() for k, v in ts.items()})
    doc = result.as_dict()
    if tensors:
        save_file(tensors, str(out / TRIGGERS_FILE))
        doc["triggers_file"] = TRIGGERS_FILE
    if pictures:
        from bna_gateway.mitigation.detection.pictures import plot_scores, plot_triggers

        doc["pictures"] = [plot_scores(result, out / "anomaly_scores.png"), *plot_triggers(result, out)]
    path = out / DETECTION_JSON
    path.write_text(json.dumps(doc, indent=2))
    return path


def detection_path(path: Path) -> Path:
    """``path`` itself, or ``path/detection.json`` for a folder."""
    path = Path(path)
    return path / DETECTION_JSON if path.is_dir() else path


def read_document(path: Path) -> dict[str, Any]:
    """The saved detection document (``FileNotFoundError`` with the path when it is not there)."""
    path = detection_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"detection file not found: {path}")
    return json.loads(path.read_text())


def read_detection(path: Path) -> DetectionResult:
    """A saved detection, loaded back (a folder, or its ``detection.json``)."""
    path = detection_path(path)
    doc = read_document(path)
    return DetectionResult(
        pairs=[PairRecord.from_dict(p) for p in doc.get("pairs", [])],
        threshold=float(doc.get("threshold", 0.0)),
        trigger_type=doc.get("trigger_type", ""),
        triggers=_read_triggers(path, doc),
        seconds=float(doc.get("seconds", 0.0)),
        timings=dict(doc.get("timings", {})),
        eliminated=[Elimination.from_dict(e) for e in doc.get("eliminated_pairs", [])],
        added_sources=[AddedSource.from_dict(a) for a in doc.get("added_sources", [])],
        statistic=doc.get("statistic", "plain"),
        transferred=[Transfer.from_dict(m) for m in doc.get("transferred", [])],
        refitted=[DomainRefit.from_dict(r) for r in doc.get("refitted_on_domain", [])],
        target_evidence={f: TargetEvidence.from_dict(e) for f, e in doc.get("targets", {}).items()},
        target_threshold=doc.get("target_threshold"),
        narrow=[NarrowTrigger.from_dict(n) for n in doc.get("narrow_triggers", [])],
        memory=[MemoryCheck.from_dict(m) for m in doc.get("memory_checks", [])],
        precision=doc.get("precision", "float32"),
    )


def _read_triggers(path: Path, doc: dict[str, Any]) -> dict[int, TargetTrigger]:
    info = doc.get("triggers", {})
    if not info:
        return {}
    tfile = path.parent / doc.get("triggers_file", TRIGGERS_FILE)
    if not tfile.is_file():
        raise FileNotFoundError(f"{path} lists triggers but {tfile} is missing")
    raw = load_file(str(tfile))
    triggers: dict[int, TargetTrigger] = {}
    for key, meta in info.items():
        t = int(key)
        mine = [k.split(".")[1:] for k in raw if k.split(".", 1)[0] == key]
        tensors = {p[0]: raw[f"{key}.{p[0]}"] for p in mine if len(p) == 1}
        alternatives: dict[str, dict[str, torch.Tensor]] = {}
        for p in mine:
            if len(p) == 3 and p[0] == ALSO:
                alternatives.setdefault(p[1], {})[p[2]] = raw[f"{key}.{ALSO}.{p[1]}.{p[2]}"]
        missing = set(meta.get("also", [])) - set(alternatives)
        if missing:
            raise ValueError(f"{tfile} lacks the target-{t} trigger estimates {sorted(missing)}")
        triggers[t] = TargetTrigger(t, [int(s) for s in meta["sources"]], meta["family"], tensors,
                                    float(meta["asr"]), float(meta["size"]), float(meta.get("score", 0.0)),
                                    [int(c) for c in meta.get("fit_classes", [])], alternatives,
                                    [int(u) for u in meta.get("shared_with", [])])
    return triggers
