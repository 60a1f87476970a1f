"""Writing and reading a detection: ``detection.json``, ``triggers.safetensors`` and the pictures."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bna_gateway.mitigation.detection.detect import DetectionResult, TargetTrigger

DETECTION_JSON = "detection.json"
TRIGGERS_FILE = "triggers.safetensors"
ALSO = "also"  # key "<target>.also.<variant>.<tensor>": TargetTrigger.also


def write_detection(result: DetectionResult, out: Path, pictures: bool = True) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"{t}.{k}": v.contiguous().float() for t, tr in result.triggers.items() for k, v in tr.tensors.items()}
    tensors.update({f"{t}.{ALSO}.{fam}.{k}": v.contiguous().float() for t, tr in result.triggers.items()
                    for fam, ts in tr.also.items() for k, v in ts.items()})
    doc = result.as_dict()
    if tensors:
        save_file(tensors, str(out / TRIGGERS_FILE))
        doc["triggers_file"] = TRIGGERS_FILE
    if pictures:
        from bna_gateway.mitigation.detection.pictures import plot_scores, plot_triggers

        doc["pictures"] = [plot_scores(result, out / "anomaly_scores.png")]
        doc["pictures"] += plot_triggers(result, out)
    path = out / DETECTION_JSON
    path.write_text(json.dumps(doc, indent=2))
    return path


def read_triggers(path: Path) -> tuple[dict, dict[int, TargetTrigger]]:
    """The detection document and its per-target triggers."""
    path = Path(path)
    if path.is_dir():
        path = path / DETECTION_JSON
    if not path.is_file():
        raise FileNotFoundError(f"detection file not found: {path}")
    doc = json.loads(path.read_text())
    triggers: dict[int, TargetTrigger] = {}
    info = doc.get("triggers", {})
    if info:
        tfile = path.parent / doc.get("triggers_file", TRIGGERS_FILE)
        if not tfile.is_file():
            raise FileNotFoundError(f"{path} lists triggers but {tfile} is missing")
        raw = load_file(str(tfile))
        for key, meta in info.items():
            t = int(key)
            mine = [k.split(".")[1:] for k in raw if k.split(".", 1)[0] == key]
            tensors = {p[0]: raw[f"{key}.{p[0]}"] for p in mine if len(p) == 1}
            also: dict[str, dict[str, torch.Tensor]] = {}
            for p in mine:
                if len(p) == 3 and p[0] == ALSO:
                    also.setdefault(p[1], {})[p[2]] = raw[f"{key}.{ALSO}.{p[1]}.{p[2]}"]
            missing = set(meta.get("also", [])) - set(also)
            if missing:
                raise ValueError(f"{tfile} lacks the target-{t} trigger estimates {sorted(missing)}")
            triggers[t] = TargetTrigger(t, [int(s) for s in meta["sources"]], meta["family"], tensors,
                                        float(meta["asr"]), float(meta["size"]), float(meta.get("score", 0.0)),
                                        [int(c) for c in meta.get("fit_classes", [])], also,
                                        [int(u) for u in meta.get("shared_with", [])])
    return doc, triggers


def scores_table(doc: dict) -> str:
    """The flagged pairs and the top unflagged ones, as text for the CLI."""
    pairs = sorted(doc["pairs"], key=lambda p: -p["score"])
    lines = [f"{'source':>6} {'target':>6} {'family':>12} {'size':>8} {'asr':>5} {'score':>7}  flagged"]
    shown = [p for p in pairs if p["flagged"]] + [p for p in pairs if not p["flagged"]][:3]
    for p in shown:
        lines.append(f"{p['source']:>6} {p['target']:>6} {p['family']:>12} {p['size']:>8.2f} {p['asr']:>5.2f} "
                     f"{p['score']:>7.2f}  {'yes' if p['flagged'] else 'no'}")
    for e in doc.get("eliminated_pairs", []):
        joint = "none found" if e["joint_size"] == float("inf") else f"{e['joint_size']:.2f}"
        lines.append(f"eliminated {e['source']} -> {e['target']}: joint trigger {joint} vs "
                     f"{e['smallest_size']:.2f} for the smallest pair alone (sources share no trigger)")
    moves: dict[tuple[int, int, str], dict] = {}
    for m in doc.get("transferred", []):  # a pair may be tightened several times: first size, last trigger
        key = (m["source"], m["target"], m["family"])
        moves[key] = {**m, "size_before": moves.get(key, m)["size_before"]}
    for m in moves.values():
        lines.append(f"pair {m['source']} -> {m['target']} ({m['family']}): the trigger of {m['from'][0]} -> "
                     f"{m['from'][1]} also works there ({100 * m['asr']:.0f}%): size {m['size_before']:.2f} -> "
                     f"{m['size']:.2f}")
    for a in doc.get("added_sources", []):
        if a.get("trigger_of", a["target"]) == a["target"]:
            lines.append(f"source {a['source']} added to target {a['target']}: its trigger sends "
                         f"{100 * a['asr']:.0f}% of the class's clean images there")
        else:
            lines.append(f"target {a['target']} (source {a['source']}) added: the trigger of target "
                         f"{a['trigger_of']} sends {100 * a['asr']:.0f}% of class {a['source']}'s clean images there")
    for t, meta in doc.get("triggers", {}).items():
        fams = [f for f in meta.get("also", []) if f != "shared"]
        if fams:
            lines.append(f"target {t}: anomalous in the {', '.join(fams)} family too; its twin is "
                         f"fitted on that estimate as well as on the {meta['family']} one")
        if "shared" in meta.get("also", []):
            lines.append(f"target {t}: the patches of targets {meta.get('shared_with', [])} also fire its sources; "
                         f"its twin is fitted on their union too")
    if "statistic" in doc:
        lines.append(f"statistic: {doc['statistic']}, threshold {doc['threshold']}")
    return "\n".join(lines)


def load_tensor_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tensors.items()}
