"""Peers benchmark: BNA beside the defences a user would pick instead, on the same models, in one run.

Usage: python bench/peers.py [--attacks badnet,blend,...] [--clean-sizes 50,10] [--defences ft,fp,nc,anp,ft_sam]
                             [--detectors strip,ibd_psc,scale_up] [--models artifacts/models] [--out bench/results]
                             [--seed 0] [--device auto] [--rebuild] [--quiet]

For every attack of the attack lab (mnist5k, ResNet-18 width 16, target 9) with 50 clean images per class,
and for BadNet and Blend also with 10: ACC / ASR / DER of the poisoned model (vanilla), of BNA (the
gateway's answers, routed by the serving code) and of every model-level peer (``bench/peers/``), each
given the same model and the same clean set as BNA. At 50 per class also the test-time input detectors
(STRIP, IBD-PSC, SCALE-UP) beside the gateway's trigger flag: TPR / FPR on the held-out split and forward
passes per input. Models and bundles come from ``bench/attack_matrix.py``'s commands and are reused
(``--rebuild`` re-runs ``bna mitigate``). Writes ``<out>/peers.json`` (the issue's shape),
``peers_details.json`` (hyper-parameters, thresholds, timings, SIA, the host), ``peers.md`` and the
figures ``peers_der.png`` and ``peers_detectors.png``, after every setting. docs/peers.md explains them.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from bna_gateway.mitigation.detection.io import read_detection
from bna_gateway.mitigation.evaluation import Evaluation, der, evaluate_bundle, route_all
from bna_gateway.mitigation.lab.attacks import AttackSpec, build_trigger
from bna_gateway.mitigation.lab.datasets import load_ref
from bna_gateway.mitigation.lab.metrics import AttackMetrics, attack_metrics, predict
from bna_gateway.mitigation.modeldir import ModelSource, load_clean_set, load_model_dir
from bna_gateway.models.bundle import LoadedBundle, load_bundle
from bna_gateway.models.device import resolve_device
from peers import DETECTORS, MODEL_DEFENCES, anp, fp, ft, ft_sam, nc
from peers.artifacts import Built, bundle_created, detection_dir, ensure_bundle, ensure_model
from peers.common import FALSE_ALARM_BUDGET, Calibrated, FinetuneConfig, Repaired, calibrate
from peers.ibd_psc import PAPER_T, IbdPsc
from peers.report import markdown, plot_der, plot_detectors
from peers.scale_up import ScaleUp
from peers.strip import Strip
from provenance import commit  # noqa: E402  (bench/ is the script's folder)

log = logging.getLogger("peers")
ATTACKS = ("badnet", "badnet_a2a", "chessboard", "blend", "sig", "wanet")
SMALL_CLEAN = ("badnet", "blend")  # also measured with 10 clean images per class


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--clean-sizes", default="50,10", help="50 for every attack; 10 for badnet and blend")
    ap.add_argument("--defences", default=",".join(MODEL_DEFENCES))
    ap.add_argument("--detectors", default=",".join(DETECTORS), help="'' for none")
    ap.add_argument("--models", type=Path, default=Path("artifacts/models"))
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="auto (default), cpu, cuda")
    ap.add_argument("--rebuild", action="store_true", help="re-run 'bna mitigate' even where a bundle exists")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    ap.add_argument("--finetune-lr", type=float, default=FinetuneConfig.lr,
                    help="learning rate of FT, FP, NC and FT-SAM (default 0.1: BackdoorBench's 0.01 scaled to the "
                         "lab's training lr; 0.01 is BackdoorBench's absolute value)")
    ap.add_argument("--report-only", action="store_true",
                    help="rewrite peers.md and the figures from <out>/peers.json and peers_details.json only")
    ap.add_argument("--commit", default=None, help="the commit to record (default: git's HEAD, '+dirty' if changed)")
    ap.add_argument("--smoke", action="store_true",
                    help="a plumbing check: 2 epochs, 5 ANP iterations, 2 STRIP copies (figures meaningless)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.report_only:
        doc = json.loads((args.out / "peers.json").read_text())
        write_outputs(doc, json.loads((args.out / "peers_details.json").read_text()), args.out)
        print(f"peers: rewrote {args.out}/peers.md and the figures")
        return
    attacks = _pick(args.attacks, ATTACKS, "attack")
    sizes = [int(s) for s in args.clean_sizes.split(",") if s]
    settings = [(a, pc) for a in attacks for pc in (50, 10) if pc in sizes and (pc == 50 or a in SMALL_CLEAN)]
    defences = _pick(args.defences, MODEL_DEFENCES, "defence")
    detectors = _pick(args.detectors, DETECTORS, "detector")
    device = resolve_device(args.device)
    start = time.perf_counter()
    doc: dict[str, Any] = {"commit": args.commit or commit(), "rows": [], "detectors": []}
    details: dict[str, Any] = {"commit": doc["commit"], "seed": args.seed, "host": _host(), "settings": [],
                               "false_alarm_budget": FALSE_ALARM_BUDGET, "command": _command(args),
                               "hyper_parameters": _hyper_parameters(args.seed, args.finetune_lr)}
    complete = len(settings) == len(ATTACKS) + len(SMALL_CLEAN)
    if args.smoke:
        details["smoke"] = True
    if not complete or len(defences) < len(MODEL_DEFENCES) or len(detectors) < len(DETECTORS):
        details["partial"] = (f"settings {[f'{a}@{pc}' for a, pc in settings]}, defences {defences}, "
                              f"detectors {detectors}")
    for attack, per_class in settings:
        rows, dets, info = run_setting(attack, per_class, defences, detectors if per_class == 50 else [], args, device)
        doc["rows"] += rows
        doc["detectors"] += dets
        details["settings"].append(info)
        details["wall_seconds"] = round(time.perf_counter() - start, 1)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        details["cpu_seconds"] = round(time.process_time() + children.ru_utime + children.ru_stime, 1)
        details["host"]["load_average_end"] = os.getloadavg()
        details["checks"] = faithfulness_checks(doc)
        write_outputs(doc, details, args.out)
    minutes = (time.perf_counter() - start) / 60
    print(f"peers: {len(settings)} settings in {minutes:.1f} min; wrote {args.out}/peers.json")


def _pick(arg: str, known: tuple[str, ...], what: str) -> list[str]:
    picked = [a for a in arg.split(",") if a]
    unknown = sorted(set(picked) - set(known))
    if unknown:
        raise SystemExit(f"unknown {what}(s) {unknown}: use {', '.join(known)}")
    return list(dict.fromkeys(picked))  # the order given is the order run (outputs are written after each)


# ---------------------------------------------------------------- one setting
def run_setting(attack: str, per_class: int, defences: list[str], detectors: list[str], args: argparse.Namespace,
                device: torch.device) -> tuple[list[dict], list[dict], dict[str, Any]]:
    model_built = ensure_model(args.models, attack, args.seed)
    bundle_built = ensure_bundle(args.models, attack, per_class, args.seed, args.rebuild)
    model = load_model_dir(model_built.path)
    clf = model.classifier.to(device).eval()
    spec = model.attack or AttackSpec()
    assert model.spec.dataset is not None
    test = load_ref(model.spec.dataset).test
    clean = load_clean_set(model, ModelSource(model_dir=model_built.path, clean_per_class=per_class), args.seed)
    k = model.spec.num_classes
    trigger = build_trigger(spec, tuple(model.spec.input.shape))
    victims = spec.victims(test.y)
    x_trig = torch.cat([trigger(test.x[victims][i : i + 500]) for i in range(0, int(victims.sum()), 500)])
    targets = sorted(set(spec.target_of(test.y[victims], k).tolist()))

    def metrics(m: nn.Module | Callable) -> AttackMetrics:
        full = torch.full_like(test.y, -1)
        full[victims] = predict(m, x_trig, device=device)
        return attack_metrics(predict(m, test.x, device=device), test.y, full, spec, k)

    vanilla = metrics(clf)
    info: dict[str, Any] = {"attack": attack, "clean_per_class": per_class, "clean_images": len(clean),
                            "model": _artifact(model_built), "bundle": _artifact(bundle_built),
                            "bundle_created": bundle_created(bundle_built.path), "true_targets": targets,
                            "defences": {"vanilla": {**vanilla.as_dict(), "der": 0.5}}, "detectors": {}}
    rows = [_row(attack, per_class, "vanilla", vanilla, 0.5)]

    t0 = time.perf_counter()
    bundle = load_bundle(bundle_built.path, device)
    ev = evaluate_bundle(bundle, spec, test)  # the product's evaluation (bna evaluate), the serving routing rule
    info["defences"]["bna"] = {**ev.mitigated.as_dict(), "der": ev.der, "seconds": bundle_built.seconds,
                               "cpu_seconds": bundle_built.cpu_seconds,
                               "evaluate_seconds": round(time.perf_counter() - t0, 1),
                               "detected_targets": ev.detected_targets}
    rows.append(_row(attack, per_class, "bna", ev.mitigated, ev.der))
    print(f"{attack:11s} {per_class:3d}/class vanilla ACC {vanilla.acc:.3f} ASR {vanilla.asr:.3f} | "
          f"bna ACC {ev.mitigated.acc:.3f} ASR {ev.mitigated.asr:.3f} DER {ev.der:.3f}", flush=True)

    triggers = [t.module() for _, t in sorted(read_detection(detection_dir(bundle_built.path)).triggers.items())]
    for name in defences:
        torch.manual_seed(args.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        repaired = _defend(name, clf, clean.x.to(device), clean.y.to(device), triggers, args)
        m = metrics(repaired.model.eval())
        seconds = round(time.perf_counter() - t0, 1)
        d = der(vanilla, m)
        info["defences"][name] = {**m.as_dict(), "der": d, "seconds": seconds,
                                  "cpu_seconds": round(time.process_time() - c0, 1), **repaired.info}
        rows.append(_row(attack, per_class, name, m, d))
        print(f"{'':11s} {name:7s} ACC {m.acc:.3f} ASR {m.asr:.3f} DER {d:.3f} ({seconds:.0f} s)", flush=True)

    dets: list[dict] = []
    if detectors:
        dets.append(_ours(attack, bundle, ev, test.x, test.y, x_trig, targets, info))
        for name in detectors:
            dets.append(_detector(name, attack, clf, clean.x, clean.y, test.x, test.y, x_trig, targets, args,
                                  info))
    return rows, dets, info


def _defend(name: str, clf: nn.Module, x: torch.Tensor, y: torch.Tensor, triggers: list[nn.Module],
            args: argparse.Namespace) -> Repaired:
    seed, progress, smoke = args.seed, not args.quiet, args.smoke
    cfg = FinetuneConfig(seed=seed, progress=progress, epochs=2 if smoke else FinetuneConfig.epochs,
                         lr=args.finetune_lr)
    if name == "ft":
        return ft.defend(clf, x, y, cfg)
    if name == "fp":
        return fp.defend(clf, x, y, cfg)
    if name == "nc":
        return nc.defend(clf, x, y, [t.to(x.device) for t in triggers], cfg)
    if name == "anp":
        return anp.defend(clf, x, y, anp.ANPConfig(seed=seed, progress=progress,
                                                   nb_iter=5 if smoke else anp.ANPConfig.nb_iter))
    if name == "ft_sam":
        return ft_sam.defend(clf, x, y, cfg)
    raise ValueError(name)


def _ours(attack: str, bundle: LoadedBundle, ev: Evaluation, x: torch.Tensor, y: torch.Tensor,
          x_trig: torch.Tensor, targets: list[int], info: dict[str, Any]) -> dict[str, Any]:
    """The gateway's flag as the product produces it (``bna evaluate``'s TPR / FPR), its cost from the routing."""
    routed, routed_t = route_all(bundle, x), route_all(bundle, x_trig)
    of_targets = torch.isin(y, torch.tensor(targets))
    forwards = 1 + float(routed.checked_by_twin.float().mean())  # f for every image, g_t for those f gives t
    info["detectors"]["bna"] = {
        "tpr": ev.tpr, "tpr_when_f_fooled": ev.tpr_when_f_fooled, "fpr": ev.fpr, "fpr_all_clean": ev.fpr_all_clean,
        "fpr_true_target_class": float(routed.trigger_detected[of_targets].float().mean()),
        "forwards_clean": forwards, "forwards_triggered": 1 + float(routed_t.checked_by_twin.float().mean()),
        "detected_targets": ev.detected_targets}
    return {"attack": attack, "detector": "bna", "tpr": ev.tpr, "fpr": ev.fpr, "forwards_per_input": round(forwards, 3)}


def _detector(name: str, attack: str, clf: nn.Module, cx: torch.Tensor, cy: torch.Tensor, x: torch.Tensor,
              y: torch.Tensor, x_trig: torch.Tensor, targets: list[int], args: argparse.Namespace,
              info: dict[str, Any]) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    strip = Strip(seed=args.seed, n_overlays=2 if args.smoke else Strip.n_overlays)
    det = {"strip": lambda: strip, "ibd_psc": IbdPsc, "scale_up": ScaleUp}[name]()
    cal: Calibrated = calibrate(det, clf, cx, cy)
    s_clean, s_trig = det.score(x), det.score(x_trig)
    of_targets = torch.isin(y, torch.tensor(targets))
    flag_clean, flag_trig = s_clean > cal.threshold, s_trig > cal.threshold
    tpr, fpr = float(flag_trig.float().mean()), float(flag_clean[of_targets].float().mean())
    extra: dict[str, Any] = {"tpr": tpr, "fpr": fpr, "fpr_all_clean": float(flag_clean.float().mean()),
                             "threshold": cal.threshold, "defender_clean_flag_rate": cal.clean_flag_rate,
                             "score_clean_mean": float(s_clean.mean()), "score_triggered_mean": float(s_trig.mean()),
                             "seconds": round(time.perf_counter() - t0, 1),
                             "cpu_seconds": round(time.process_time() - c0, 1)}
    if name == "ibd_psc":
        extra["start_layer"] = det.start
        extra["at_paper_T"] = {"T": PAPER_T, "tpr": float((s_trig >= PAPER_T).float().mean()),
                               "fpr": float((s_clean[of_targets] >= PAPER_T).float().mean()),
                               "fpr_all_clean": float((s_clean >= PAPER_T).float().mean())}
    info["detectors"][name] = extra
    print(f"{'':11s} {name:8s} TPR {tpr:.3f} FPR {fpr:.3f} (all clean {extra['fpr_all_clean']:.3f}, "
          f"{det.forwards_per_input} passes, {extra['seconds']:.0f} s)", flush=True)
    return {"attack": attack, "detector": name, "tpr": tpr, "fpr": fpr, "forwards_per_input": det.forwards_per_input}


def _row(attack: str, per_class: int, defence: str, m: AttackMetrics, d: float | None) -> dict[str, Any]:
    return {"attack": attack, "clean_per_class": per_class, "defence": defence, "acc": m.acc, "asr": m.asr, "der": d}


def _artifact(b: Built) -> dict[str, Any]:
    return {"path": str(b.path), "built_here": b.built, "seconds": b.seconds and round(b.seconds, 1),
            "cpu_seconds": b.cpu_seconds and round(b.cpu_seconds, 1)}


# ---------------------------------------------------------------- checks, provenance, outputs
# (peer, attack, claim, value from the results, predicate): a peer's known behaviour that must show here
CHECKS: list[tuple[str, str, str, str, Callable[[float], bool]]] = [
    ("nc", "badnet", "NC unlearning removes BadNet's backdoor: ASR <= 0.10", "asr", lambda v: v <= 0.10),
    ("ft", "badnet", "FT removes BadNet (BackdoorBench's best, DER 0.961): ASR <= 0.10", "asr", lambda v: v <= 0.10),
    ("ft_sam", "badnet", "FT-SAM removes BadNet (its paper: ASR 0.016): ASR <= 0.10", "asr", lambda v: v <= 0.10),
    ("anp", "badnet", "ANP removes BadNet (its paper: ASR < 0.01): ASR <= 0.10", "asr", lambda v: v <= 0.10),
    ("anp", "blend", "ANP removes Blend (BackdoorBench's best, DER 0.954): ASR <= 0.10", "asr", lambda v: v <= 0.10),
    ("fp", "wanet", "FP removes WaNet (BackdoorBench's best, DER 0.943): ASR <= 0.10", "asr", lambda v: v <= 0.10),
    ("strip", "badnet", "STRIP flags BadNet inputs well above chance (0.05): TPR >= 0.5", "tpr", lambda v: v >= 0.5),
    ("ibd_psc", "badnet", "IBD-PSC flags BadNet inputs (its paper: TPR 0.98): TPR >= 0.5", "tpr", lambda v: v >= 0.5),
    ("scale_up", "badnet", "SCALE-UP flags BadNet inputs (its paper: TPR 0.95): TPR >= 0.5", "tpr", lambda v: v >= 0.5),
]


def faithfulness_checks(doc: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for peer, attack, claim, key, holds in CHECKS:
        pool = doc["detectors"] if key == "tpr" else [r for r in doc["rows"] if r["clean_per_class"] == 50]
        row = next((r for r in pool if r["attack"] == attack and r.get("defence", r.get("detector")) == peer), None)
        if row is not None and row[key] is not None:
            out.append({"peer": peer, "attack": attack, "claim": claim, "value": row[key], "holds": holds(row[key])})
    return out


def _hyper_parameters(seed: int, lr: float) -> dict[str, Any]:
    cfg = FinetuneConfig(seed=seed, lr=lr)
    return {"finetune": asdict(cfg), "batch_at_50_per_class": cfg.batch_size(500),
            "batch_at_10_per_class": cfg.batch_size(100), "fp": asdict(fp.PruneConfig()),
            "nc": asdict(nc.UnlearnConfig()), "anp": asdict(anp.ANPConfig(seed=seed)),
            "ft_sam": asdict(ft_sam.SamConfig()), "strip": {"n_overlays": Strip().n_overlays},
            "ibd_psc": {"n": IbdPsc().n, "xi": IbdPsc().xi, "scale": IbdPsc().scale, "paper_T": PAPER_T},
            "scale_up": {"scales": list(ScaleUp().scales)}, "false_alarm_budget": FALSE_ALARM_BUDGET}



def _host() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    flags = ""
    try:
        text = Path("/proc/cpuinfo").read_text()
        cpu = next((ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name")), cpu)
        flags = "AVX-512" if "avx512f" in text else ("AVX2" if "avx2" in text else "")
    except OSError:
        pass
    cores = os.cpu_count()
    return {"cpu": cpu, "isa": flags, "cores": cores, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "load_average_start": os.getloadavg(),
            "summary": f"{cpu} ({flags}), {cores} cores, torch {torch.__version__}"}


def _command(args: argparse.Namespace) -> str:
    parts = ["python bench/peers.py"]
    for k, v in vars(args).items():
        if v is None or v is False or k == "quiet":
            continue
        parts.append(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}"))
    return " ".join(parts)


def write_outputs(doc: dict[str, Any], details: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "peers.json").write_text(json.dumps(doc, indent=2))
    (out / "peers_details.json").write_text(json.dumps(details, indent=2, default=float))
    (out / "peers.md").write_text(markdown(doc, details))
    plot_der(doc, out / "peers_der.png")
    if doc["detectors"]:
        plot_detectors(doc, out / "peers_detectors.png")


if __name__ == "__main__":
    main()
