"""Fit one twin ``g(.|Theta_t)``: BN statistics such that trigger-embedded activations match clean ones.

For each BN layer and channel, the reference is the histogram of the layer's output on clean images
through the original network; the candidate is the soft histogram of the same layer's output on
trigger-embedded images through the twin. The loss is the divergence between the two, averaged over
a layer's channels and weighted per layer by how much the trigger shifted that layer before fitting.
All channels of a layer, and all layers, are optimised together: one forward/backward per step over
the whole candidate set (full-set histograms; mini-batch histograms have a noise floor above the
trigger's real shift). Sets too large for one pass are processed in chunks with an exact two-pass
gradient (histograms are sums over images).

Parameterisation: ``mean = m0 + s0 * u`` and ``std = s0 * exp(v)`` with ``u = v = 0`` at the start, so
Adam's learning rate is relative to each channel's own scale. The start ``(m0, s0)`` is the statistics
re-estimated on the candidate images.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from bna_gateway.models.twins import TwinStats
from bna_gateway.mitigation.attacks import Trigger
from bna_gateway.mitigation.bna.histogram import BinSpec, divergence, hard_histogram, soft_histogram
from bna_gateway.mitigation.bna.stats import capture_bn_outputs, channel_view, reestimate_bn
from bna_gateway.models.network import bn_layers

log = logging.getLogger(__name__)


@dataclass
class BNAConfig:
    divergence: str = "tv"
    bin_width: float = 0.1
    tau: float = 150.0
    steps: int = 60
    lr: float = 0.08  # full-set steps, fewer than the paper's 10 mini-batch epochs at 0.01: a larger step (measured, README)
    warmup: int = 10  # linear learning-rate warm-up: Adam's first steps move every statistic by ~lr at once (README)
    include_target_clean: bool = True  # clean target-class images in both sets keep their features intact
    layer_weighting: bool = True  # weight each layer by its divergence before fitting
    chunk: int = 512  # images per forward pass
    grid: int | None = 7  # histogram over a fixed ~7x7 grid of positions per feature map (None: all)
    margin_quantile: float = 0.9  # serving threshold: this quantile of clean target images' twin margin
    progress: bool = True


@dataclass
class TwinFit:
    stats: TwinStats
    divergence_before: dict[str, float]
    divergence_after: dict[str, float]
    divergence_init: dict[str, float]
    loss_history: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _layer_histograms(model: nn.Module, x: torch.Tensor, bins: dict[str, BinSpec], widths: dict[str, torch.Tensor],
                      cfg: BNAConfig, stats: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
                      soft: bool = True) -> dict[str, torch.Tensor]:
    """Total histogram of every BN layer's output over ``x`` (no grad)."""
    totals: dict[str, torch.Tensor] = {}

    def sink(name: str, out: torch.Tensor) -> None:
        a = channel_view(out, cfg.grid)
        h = soft_histogram(a, bins[name], widths[name], cfg.tau) if soft else hard_histogram(a, bins[name], widths[name])
        totals[name] = totals[name] + h if name in totals else h

    with torch.no_grad(), capture_bn_outputs(model, sink, stats):
        for i in range(0, len(x), cfg.chunk):
            model(x[i : i + cfg.chunk])
    return totals


def _clean_reference(model: nn.Module, x: torch.Tensor, cfg: BNAConfig) -> tuple[dict[str, BinSpec], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    lo: dict[str, torch.Tensor] = {}
    hi: dict[str, torch.Tensor] = {}

    def sink(name: str, out: torch.Tensor) -> None:
        a = channel_view(out, cfg.grid)
        lo[name] = torch.minimum(lo[name], a.min(1).values) if name in lo else a.min(1).values
        hi[name] = torch.maximum(hi[name], a.max(1).values) if name in hi else a.max(1).values

    with torch.no_grad(), capture_bn_outputs(model, sink):
        for i in range(0, len(x), cfg.chunk):
            model(x[i : i + cfg.chunk])
    bins = {n: BinSpec.from_range(lo[n], hi[n], cfg.bin_width) for n in lo}
    widths = {n: bins[n].widths(hi[n] - lo[n]) for n in lo}
    ref = _layer_histograms(model, x, bins, widths, cfg, soft=False)
    return bins, widths, ref


def _per_layer(ref: dict[str, torch.Tensor], cand: dict[str, torch.Tensor], kind: str) -> dict[str, float]:
    return {n: float(divergence(ref[n], cand[n], kind).mean()) for n in ref}


def _lr_factor(step: int, cfg: BNAConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warm-up over the first ``cfg.warmup`` steps, then 1.

    Adam's first steps are about ``lr`` times the sign of the gradient for every statistic at once; on
    a trigger that shifts every layer (chessboard) a full first step at lr 0.08 raised the loss, and
    the fit never came back below its start (ASR 0.80). ``warmup = 0`` gives 1 from the first step."""
    return min(1.0, (step + 1) / (cfg.warmup + 1))


def embed_round_robin(src: torch.Tensor, triggers: list[Trigger], chunk: int) -> torch.Tensor:
    """Image ``i`` gets ``triggers[i % len(triggers)]`` (e.g. one estimate at several strengths)."""
    out = torch.empty_like(src)
    with torch.no_grad():
        for k, trig in enumerate(triggers):
            idx = torch.arange(k, len(src), len(triggers), device=src.device)
            for i in range(0, len(idx), chunk):
                out[idx[i : i + chunk]] = trig(src[idx[i : i + chunk]])
    return out


def fit_twin(model: nn.Module, target: int, x: torch.Tensor, y: torch.Tensor, sources: list[int],
             trigger: Trigger | list[Trigger], cfg: BNAConfig | None = None, bn_prefix: str = "net.",
             aux: list[int] | tuple[int, ...] = ()) -> TwinFit:
    """Fit ``g(.|Theta_target)`` for ``model`` (a ``Classifier``; images in [0, 1]).

    ``x, y``: the defender's clean set; ``sources``: S(target); ``trigger``: the estimated trigger, or
    several variants of it (applied round-robin to the source images). ``aux``: more classes to fit on
    (those the trigger moves elsewhere). The twin learns from all their images, yet serves S(target)
    first: the source images are repeated until they weigh as much as the aux ones, each copy with the
    next variant (on an all-to-all model, an even pool left ASR 0.69 on a pair that a source-only fit
    had brought to 0.00).
    """
    cfg = cfg or BNAConfig()
    t0 = time.perf_counter()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    device = x.device
    triggers = [t.to(device) for t in (trigger if isinstance(trigger, list) else [trigger])]
    src = x[torch.isin(y, torch.tensor(sources, device=y.device))]
    extra = x[torch.isin(y, torch.tensor([c for c in aux if c not in sources and c != target], dtype=y.dtype,
                                         device=y.device))]
    if len(extra) and len(src):
        src = torch.cat([src.repeat_interleave(max(1, round(len(extra) / len(src))), 0), extra])
    tgt = x[y == target]
    trig = embed_round_robin(src, triggers, cfg.chunk)
    ref_x = torch.cat([src, tgt]) if cfg.include_target_clean else src
    cand_x = torch.cat([trig, tgt]) if cfg.include_target_clean else trig

    bins, widths, ref = _clean_reference(model, ref_x, cfg)
    before = _per_layer(ref, _layer_histograms(model, cand_x, bins, widths, cfg), cfg.divergence)
    top = max(before.values()) or 1.0
    weights = {n: (before[n] / top if cfg.layer_weighting else 1.0) for n in before}

    init = reestimate_bn(model, cand_x, lambda m, xb: m(xb), cfg.chunk)
    names = list(init)
    m0 = {n: init[n][0].to(device) for n in names}
    s0 = {n: (init[n][1].to(device) + bn_layers(model)[n].eps).sqrt() for n in names}
    u = {n: torch.zeros_like(m0[n], requires_grad=True) for n in names}
    v = {n: torch.zeros_like(m0[n], requires_grad=True) for n in names}
    opt = torch.optim.Adam([*u.values(), *v.values()], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: _lr_factor(i, cfg))
    eps = {n: bn_layers(model)[n].eps for n in names}

    def current() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {n: (m0[n] + s0[n] * u[n], (s0[n] * v[n].exp()) ** 2 - eps[n]) for n in names}

    def loss_of(hists: dict[str, torch.Tensor]) -> torch.Tensor:
        return sum(weights[n] * divergence(ref[n], hists[n], cfg.divergence).mean() for n in names)  # type: ignore[return-value]

    init_div = _per_layer(ref, _layer_histograms(model, cand_x, bins, widths, cfg, current()), cfg.divergence)
    history: list[float] = []
    best_loss = float("inf")
    best = {n: (u[n].detach().clone(), v[n].detach().clone()) for n in names}
    n_chunks = (len(cand_x) + cfg.chunk - 1) // cfg.chunk
    for _ in tqdm(range(cfg.steps), desc=f"BNA target {target}", unit="step", disable=not cfg.progress):
        opt.zero_grad(set_to_none=True)
        if n_chunks == 1:
            hists: dict[str, torch.Tensor] = {}
            stats = current()

            def sink(name: str, out: torch.Tensor) -> None:
                hists[name] = soft_histogram(channel_view(out, cfg.grid), bins[name], widths[name], cfg.tau)

            with capture_bn_outputs(model, sink, stats):
                model(cand_x)
            loss = loss_of(hists)
            loss.backward()
            value = float(loss.detach())
        else:  # exact full-set gradient in two passes: totals first, then d loss / d histogram per chunk
            with torch.no_grad():
                totals = _layer_histograms(model, cand_x, bins, widths, cfg, current())
            leaves = {n: h.clone().requires_grad_(True) for n, h in totals.items()}
            loss = loss_of(leaves)
            grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
            value = float(loss)
            for i in range(0, len(cand_x), cfg.chunk):
                parts: list[torch.Tensor] = []
                stats = current()

                def chunk_sink(name: str, out: torch.Tensor) -> None:
                    h = soft_histogram(channel_view(out, cfg.grid), bins[name], widths[name], cfg.tau)
                    parts.append((grads[name] * h).sum())

                with capture_bn_outputs(model, chunk_sink, stats):
                    model(cand_x[i : i + cfg.chunk])
                torch.stack(parts).sum().backward()
        history.append(value)
        if value < best_loss:
            best_loss = value
            best = {n: (u[n].detach().clone(), v[n].detach().clone()) for n in names}
        opt.step()
        sched.step()
    with torch.no_grad():
        for n in names:
            u[n].copy_(best[n][0])
            v[n].copy_(best[n][1])
        final = {n: (m.detach(), var.detach().clamp(min=0)) for n, (m, var) in current().items()}
    after = _per_layer(ref, _layer_histograms(model, cand_x, bins, widths, cfg, final), cfg.divergence)
    strip = len(bn_prefix)
    stats = TwinStats(
        target,
        {n[strip:] if n.startswith(bn_prefix) else n: m.cpu() for n, (m, _) in final.items()},
        {n[strip:] if n.startswith(bn_prefix) else n: var.cpu() for n, (_, var) in final.items()},
        0.0,
        list(sources),
    )
    stats.flag_margin = calibrate_margin(model, stats, tgt, target, cfg.margin_quantile, bn_prefix)
    seconds = time.perf_counter() - t0
    log.info("twin for target %d: loss %.4f -> %.4f in %.1f s, flag margin %.3f",
             target, history[0] if history else float("nan"), best_loss, seconds, stats.flag_margin)
    strip_names = lambda d: {k[strip:] if k.startswith(bn_prefix) else k: val for k, val in d.items()}  # noqa: E731
    return TwinFit(stats, strip_names(before), strip_names(after), strip_names(init_div), history, seconds)


@torch.no_grad()
def calibrate_margin(model: nn.Module, stats: TwinStats, clean_target: torch.Tensor, target: int, quantile: float,
                     bn_prefix: str = "net.") -> float:
    """Serving threshold on the twin's margin ``max_{c != t} p_c - p_t``: its ``quantile`` over the
    defender's clean images of the target class (never below 0, which is the plain 'labels differ' rule)."""
    if len(clean_target) == 0 or quantile <= 0:
        return 0.0
    from bna_gateway.models.twins import TwinRouter

    router = TwinRouter(model, [stats], bn_prefix).to(clean_target.device)
    probs = router.twin_logits(clean_target, target).softmax(1)
    others = probs.clone()
    others[:, target] = -1
    margin = others.max(1).values - probs[:, target]
    return max(0.0, float(torch.quantile(margin, quantile)))
