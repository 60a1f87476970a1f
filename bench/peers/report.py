"""The peers benchmark's Markdown table and its two figures, from ``peers.json`` and ``peers_details.json``.

Published anchors (CIFAR-10, PreAct-ResNet-18; /work/shared/PAPER_NUMBERS.md) sit beside our measurements
so a reader sees where a peer does worse here than in its paper.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

DEFENCE_ORDER = ("vanilla", "bna", "ft", "fp", "nc", "anp", "ft_sam")
DETECTOR_ORDER = ("bna", "strip", "ibd_psc", "scale_up")
ATTACK_ORDER = ("badnet", "badnet_a2a", "chessboard", "blend", "sig", "wanet")
LABELS = {"vanilla": "vanilla", "bna": "BNA (ours)", "ft": "FT", "fp": "FP", "nc": "NC", "anp": "ANP",
          "ft_sam": "FT-SAM", "strip": "STRIP", "ibd_psc": "IBD-PSC", "scale_up": "SCALE-UP"}

# DER (fraction) a peer reached in its paper or on BackdoorBench's CIFAR-10 leaderboard
PUBLISHED_DER = {
    ("badnet", "ft"): 0.961, ("blend", "anp"): 0.954, ("wanet", "fp"): 0.943,  # BackdoorBench best per attack
    ("badnet", "ft_sam"): 0.9608, ("blend", "ft_sam"): 0.9590, ("sig", "ft_sam"): 0.9853, ("wanet", "ft_sam"): 0.9897,
}
# (TPR, FPR) a detector reported; STRIP's is the BNA paper's TPR at FPR 0.15, BNA's its Table 8
PUBLISHED_DETECTION = {
    ("badnet", "ibd_psc"): (0.980, 0.0075), ("blend", "ibd_psc"): (0.9999, 0.066), ("wanet", "ibd_psc"): (0.966, 0.002),
    ("badnet", "scale_up"): (0.946, 0.277), ("blend", "scale_up"): (0.917, 0.049), ("wanet", "scale_up"): (0.0, 0.053),
    ("badnet", "strip"): (0.964, 0.15), ("badnet_a2a", "strip"): (0.515, 0.15), ("chessboard", "strip"): (0.680, 0.15),
    ("wanet", "strip"): (0.020, 0.15),
    ("badnet", "bna"): (0.987, 0.139), ("badnet_a2a", "bna"): (0.951, 0.061), ("chessboard", "bna"): (0.987, 0.114),
    ("wanet", "bna"): (0.996, 0.141),
}


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _setting(attack: str, per_class: int) -> str:
    return attack if per_class == 50 else f"{attack} ({per_class}/class)"


def _settings(rows: list[dict[str, Any]]) -> list[tuple[str, int]]:
    seen = {(r["attack"], r["clean_per_class"]) for r in rows}
    return sorted(seen, key=lambda s: (-s[1], ATTACK_ORDER.index(s[0]) if s[0] in ATTACK_ORDER else 99))


def markdown(doc: dict[str, Any], details: dict[str, Any]) -> str:
    rows, dets = doc["rows"], doc["detectors"]
    defences = [d for d in DEFENCE_ORDER if any(r["defence"] == d for r in rows)]
    by = {(r["attack"], r["clean_per_class"], r["defence"]): r for r in rows}
    extra = {(s["attack"], s["clean_per_class"], d): v for s in details.get("settings", [])
             for d, v in s.get("defences", {}).items()}
    out = ["# Peers benchmark (`python bench/peers.py`)", "",
           f"Commit {doc.get('commit')}; {details.get('host', {}).get('summary', '')}; "
           f"{details.get('wall_seconds', 0) / 60:.1f} min wall; mnist5k, ResNet-18 width 16, target 9, seed "
           f"{details.get('seed', 0)}. Fractions in [0, 1].", ""]
    if details.get("smoke"):
        out += ["**Smoke run** (`--smoke`: 2 epochs, 5 ANP iterations, 2 STRIP copies): a plumbing check, "
                "not a measurement.", ""]
    lr = details.get("hyper_parameters", {}).get("finetune", {}).get("lr")
    if lr is not None:
        out += [f"Fine-tuning lr of FT, FP, NC and FT-SAM: {lr} (`--finetune-lr`; the default 0.1 is BackdoorBench's "
                "0.01 scaled to the lab's training lr).", ""]
    if details.get("partial"):
        measured = [f"{a}@{pc}" for a, pc in _settings(rows)]
        out += [f"**Partial run**: measured {measured}; asked for {details['partial']}", ""]

    out += ["## DER per attack (best per row in bold)", "",
            "| attack | " + " | ".join(LABELS[d] for d in defences if d != "vanilla") + " |",
            "|---|" + "---|" * (len(defences) - 1)]
    for attack, pc in _settings(rows):
        vals = {d: by.get((attack, pc, d), {}).get("der") for d in defences if d != "vanilla"}
        best = max((v for v in vals.values() if v is not None), default=None)
        cells = [("**" + _f(v) + "**") if v is not None and v == best else _f(v) for v in vals.values()]
        out.append(f"| {_setting(attack, pc)} | " + " | ".join(cells) + " |")

    out += ["", "## ACC / ASR / SIA per defence", "",
            "| attack | defence | ACC | ASR | SIA | DER | published DER | seconds |", "|---" * 8 + "|"]
    for attack, pc in _settings(rows):
        for d in defences:
            r = by.get((attack, pc, d))
            if r is None:
                continue
            e = extra.get((attack, pc, d), {})
            pub = PUBLISHED_DER.get((attack, d)) if pc == 50 else None
            out.append(f"| {_setting(attack, pc)} | {LABELS[d]} | {_f(r['acc'])} | {_f(r['asr'])} | "
                       f"{_f(e.get('sia'))} | {_f(r['der'])} | {_f(pub)} | {_f(e.get('seconds'), 0)} |")

    if dets:
        out += ["", f"## Test-time input detection (threshold at a {details.get('false_alarm_budget', 0.05):.0%} "
                "false-alarm budget on the defender's clean images; BNA: the gateway's own flag)", "",
                "| attack | detector | TPR | FPR (target class) | FPR (all clean) | forward passes / input | "
                "published TPR / FPR |", "|---|---|---|---|---|---|---|"]
        dextra = {(s["attack"], d): v for s in details.get("settings", []) for d, v in s.get("detectors", {}).items()}
        for attack in [a for a in ATTACK_ORDER if any(x["attack"] == a for x in dets)]:
            for d in DETECTOR_ORDER:
                row = next((x for x in dets if x["attack"] == attack and x["detector"] == d), None)
                if row is None:
                    continue
                e = dextra.get((attack, d), {})
                pub = PUBLISHED_DETECTION.get((attack, d))
                pub_s = f"{pub[0]:.3f} / {pub[1]:.3f}" if pub else "-"
                out.append(f"| {attack} | {LABELS[d]} | {_f(row['tpr'])} | {_f(row['fpr'])} | "
                           f"{_f(e.get('fpr_all_clean'))} | {row['forwards_per_input']:.2f} | {pub_s} |")

    checks = details.get("checks", [])
    if checks:
        out += ["", "## Faithfulness checks (a peer's known behaviour must show)", "",
                "| peer | attack | claim | measured | holds |", "|---|---|---|---|---|"]
        for c in checks:
            out.append(f"| {LABELS.get(c['peer'], c['peer'])} | {c['attack']} | {c['claim']} | {_f(c['value'])} | "
                       f"{'yes' if c['holds'] else '**no**'} |")
    out += ["", "Figures: `peers_der.png` (DER per attack and defence), `peers_detectors.png` (TPR against FPR on "
            "the target class, marker area proportional to forward passes per input).", ""]
    return "\n".join(out)


def plot_der(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    settings = _settings(rows)
    defences = [d for d in DEFENCE_ORDER if d != "vanilla" and any(r["defence"] == d for r in rows)]
    by = {(r["attack"], r["clean_per_class"], r["defence"]): r["der"] for r in rows}
    width = 0.8 / max(1, len(defences))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(settings) + 2), 4.6))
    for i, d in enumerate(defences):
        xs = [j + (i - (len(defences) - 1) / 2) * width for j in range(len(settings))]
        ys = [by.get((a, pc, d)) or 0.0 for a, pc in settings]
        ax.bar(xs, ys, width, label=LABELS[d], color="black" if d == "bna" else None)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([_setting(a, pc).replace(" (", "\n(") for a, pc in settings], fontsize=8)
    ax.set_ylabel("DER")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"DER per attack and defence (0.5: no change), commit {doc.get('commit')}", fontsize=9)
    ax.legend(fontsize=7, ncol=min(6, len(defences)), loc="upper center", bbox_to_anchor=(0.5, -0.14), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def plot_detectors(doc: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dets = doc["detectors"]
    markers = dict(zip(ATTACK_ORDER, "osD^vP"))
    colors = {"bna": "black", "strip": "tab:blue", "ibd_psc": "tab:orange", "scale_up": "tab:green"}
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for r in dets:
        ax.scatter(r["fpr"], r["tpr"], s=25 * r["forwards_per_input"], marker=markers.get(r["attack"], "o"),
                   facecolors="none" if r["detector"] != "bna" else colors["bna"],
                   edgecolors=colors.get(r["detector"], "grey"), linewidths=1.2)
    for d, c in colors.items():
        if any(r["detector"] == d for r in dets):
            ax.scatter([], [], color=c, label=LABELS[d])
    for a, m in markers.items():
        if any(r["attack"] == a for r in dets):
            ax.scatter([], [], marker=m, facecolors="none", edgecolors="grey", label=a)
    ax.set_xlabel("FPR (clean held-out images of the target class flagged)")
    ax.set_ylabel("TPR (triggered images flagged)")
    ax.set_xlim(-0.02, max(0.3, max((r["fpr"] for r in dets), default=0) + 0.05))
    ax.set_ylim(-0.02, 1.05)
    ax.set_title(f"Input detectors; marker area ~ forward passes per input, commit {doc.get('commit')}", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path
