"""A detection as text for the command line: flagged pairs, the best unflagged ones, and what each stage did."""
from __future__ import annotations

from bna_gateway.mitigation.detection.records import DetectionResult, Transfer


def scores_table(result: DetectionResult, unflagged: int = 3) -> str:
    pairs = sorted(result.pairs, key=lambda p: -p.score)
    lines = [f"{'source':>6} {'target':>6} {'family':>12} {'size':>8} {'asr':>5} {'score':>7}  flagged"]
    shown = [p for p in pairs if p.flagged] + [p for p in pairs if not p.flagged][:unflagged]
    for p in shown:
        lines.append(f"{p.source:>6} {p.target:>6} {p.family:>12} {p.size:>8.2f} {p.asr:>5.2f} {p.score:>7.2f}  "
                     f"{'yes' if p.flagged else 'no'}")
    for e in result.eliminated:
        joint = "none found" if e.joint_size == float("inf") else f"{e.joint_size:.2f}"
        lines.append(f"eliminated {e.source} -> {e.target}: joint trigger {joint} vs {e.smallest_size:.2f} for the "
                     "smallest pair alone (sources share no trigger)")
    lines += _transfers(result.transferred)
    for a in result.added_sources:
        if a.trigger_of == a.target:
            lines.append(f"source {a.source} added to target {a.target}: its trigger sends {100 * a.asr:.0f}% of the "
                         "class's clean images there")
        else:
            lines.append(f"target {a.target} (source {a.source}) added: the trigger of target {a.trigger_of} sends "
                         f"{100 * a.asr:.0f}% of class {a.source}'s clean images there")
    for n in result.narrow:
        lines.append(f"target {n.target} (sources {n.sources}) dropped: its {n.family} trigger moves only classes "
                     f"{n.reach}, under the {n.needed} a backdoor's trigger moves (a natural pair)")
    for m in result.memory:
        verdict = "kept" if m.kept else "dropped (a natural universal perturbation: no backdoor was trained on it)"
        lines.append(f"target {m.target}: the BatchNorm statistics remember its {m.family} trigger in a share of "
                     f"{m.share:.3f} of the training images (evidence {m.level:.1f}): {verdict}")
    for t, tr in sorted(result.triggers.items()):
        fams = [f for f in tr.alternatives if f != "shared"]
        if fams:
            lines.append(f"target {t}: anomalous in the {', '.join(sorted(fams))} family too; its twin is fitted on "
                         f"that estimate as well as on the {tr.family} one")
        if "shared" in tr.alternatives:
            lines.append(f"target {t}: the patches of targets {tr.shared_with} also fire its sources; its twin is "
                         "fitted on their union too")
    lines.append(f"statistic: {result.statistic}, threshold {result.threshold}")
    return "\n".join(lines)


def _transfers(moves: list[Transfer]) -> list[str]:
    """One line per tightened pair (a pair may be tightened several times: its first size, last trigger)."""
    first: dict[tuple[int, int, str], Transfer] = {}
    last: dict[tuple[int, int, str], Transfer] = {}
    for m in moves:
        key = (m.source, m.target, m.family)
        first.setdefault(key, m)
        last[key] = m
    def donor(m: Transfer) -> str:
        return f"the universal trigger of target {m.donor[1]}" if m.donor[0] < 0 else \
            f"the trigger of {m.donor[0]} -> {m.donor[1]}"

    return [f"pair {m.source} -> {m.target} ({m.family}): {donor(m)} also works there ({100 * m.asr:.0f}%): "
            f"size {first[k].size_before:.2f} -> {m.size:.2f}" for k, m in last.items()]
