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
re-estimated on the candidate images. docs/method.md#bna.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from bna_gateway.mitigation.bna.config import BNAConfig, TwinFit
from bna_gateway.mitigation.bna.histogram import BinSpec, divergence, hard_histogram, soft_histogram
from bna_gateway.mitigation.bna.stats import (Stats, capture_bn_outputs, channel_view, reestimate_bn,
                                              require_twin_layers, twin_layers)
from bna_gateway.models.twins import TwinRouter, TwinStats, flag_score

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reference:
    """Per-layer bins (from the clean images' range) and the clean reference histograms."""

    bins: dict[str, BinSpec]
    widths: dict[str, torch.Tensor]
    hist: dict[str, torch.Tensor]


class TwinStatistics(nn.Module):
    """The statistics being fitted: ``mean = m0 + s0 u``, ``var = (s0 exp(v))^2 - eps`` per layer."""

    def __init__(self, init: Stats, layers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.names = list(init)
        self.eps = {n: layers[n].eps for n in self.names}
        self.m0 = {n: init[n][0] for n in self.names}
        self.s0 = {n: (init[n][1] + self.eps[n]).sqrt() for n in self.names}
        self.u = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(torch.zeros_like(self.m0[n])) for n in self.names})
        self.v = nn.ParameterDict({n.replace(".", "/"): nn.Parameter(torch.zeros_like(self.m0[n])) for n in self.names})

    def current(self) -> Stats:
        out = {}
        for n in self.names:
            k = n.replace(".", "/")
            out[n] = (self.m0[n] + self.s0[n] * self.u[k], (self.s0[n] * self.v[k].exp()) ** 2 - self.eps[n])
        return out

    def snapshot(self) -> dict[str, torch.Tensor]:
        return {k: p.detach().clone() for k, p in self.named_parameters()}

    def restore(self, snap: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for k, p in self.named_parameters():
                p.copy_(snap[k])


def embed_round_robin(src: torch.Tensor, triggers: list[nn.Module], chunk: int) -> torch.Tensor:
    """Image ``i`` gets ``triggers[i % len(triggers)]`` (e.g. one estimate at several strengths)."""
    out = torch.empty_like(src)
    with torch.no_grad():
        for k, trig in enumerate(triggers):
            idx = torch.arange(k, len(src), len(triggers), device=src.device)
            for i in range(0, len(idx), chunk):
                out[idx[i : i + chunk]] = trig(src[idx[i : i + chunk]])
    return out


def fit_sets(x: torch.Tensor, y: torch.Tensor, target: int | list[int], sources: list[int],
             aux: list[int] | tuple[int, ...], triggers: list[nn.Module], cfg: BNAConfig
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference images (clean), the candidate images (triggered), and the clean target images.

    The source images are repeated until they weigh as much as the aux classes' (the twin serves S(t)
    first), each copy with the next trigger variant; the clean target images join both sets. A candidate
    set over ``cfg.max_fit_images`` is thinned evenly (``thin``): every class and variant keeps its share,
    and each optimisation step stays one pass. The clean target images returned for calibration are all.
    ``target`` may be several targets that share one fit (``fit_shared_twin``): their images are the
    target images."""
    targets = [target] if isinstance(target, int) else list(target)
    src = x[torch.isin(y, torch.tensor(sources, dtype=y.dtype, device=y.device))]
    extra_classes = [c for c in aux if c not in sources and c not in targets]
    extra = x[torch.isin(y, torch.tensor(extra_classes, dtype=y.dtype, device=y.device))]
    if len(extra) and len(src):
        src = torch.cat([src.repeat_interleave(max(1, round(len(extra) / len(src))), 0), extra])
    tgt = x[torch.isin(y, torch.tensor(targets, dtype=y.dtype, device=y.device))]
    trig = embed_round_robin(src, triggers, cfg.chunk)
    ref_x = torch.cat([src, tgt]) if cfg.include_target_clean else src
    cand_x = thin(trig, tgt if cfg.include_target_clean else tgt[:0], cfg.max_fit_images)
    return ref_x, cand_x, tgt


def thin(trig: torch.Tensor, tgt: torch.Tensor, cap: int | None) -> torch.Tensor:
    """``[trig; tgt]``, or when longer than ``cap`` an evenly spaced selection of each part in proportion
    (the parts are ordered by class, the variants interleaved, so every class and variant keeps its share)."""
    total = len(trig) + len(tgt)
    if cap is None or total <= cap:
        return torch.cat([trig, tgt])
    keep_tgt = min(len(tgt), round(cap * len(tgt) / total))
    parts = [(trig, cap - keep_tgt), (tgt, keep_tgt)]
    return torch.cat([part[torch.linspace(0, len(part) - 1, k, device=part.device).round().long()] if k else part[:0]
                      for part, k in parts])


def layer_histograms(model: nn.Module, x: torch.Tensor, ref: Reference, cfg: BNAConfig, stats: Stats | None = None,
                     soft: bool = True) -> dict[str, torch.Tensor]:
    """Total histogram of every BN layer's output over ``x`` (no grad)."""
    totals: dict[str, torch.Tensor] = {}

    def sink(name: str, out: torch.Tensor) -> None:
        a = channel_view(out, cfg.grid)
        w = ref.widths[name]
        h = soft_histogram(a, ref.bins[name], w, cfg.tau) if soft else hard_histogram(a, ref.bins[name], w)
        totals[name] = totals[name] + h if name in totals else h

    with torch.no_grad(), capture_bn_outputs(model, sink, stats):
        for i in range(0, len(x), cfg.chunk):
            model(x[i : i + cfg.chunk])
    return totals


def clean_reference(model: nn.Module, x: torch.Tensor, cfg: BNAConfig) -> Reference:
    """Bins spanning each channel's clean [min, max], and the clean images' hard histograms."""
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
    empty = Reference(bins, widths, {})
    return Reference(bins, widths, layer_histograms(model, x, empty, cfg, soft=False))


def per_layer(ref: Reference, cand: dict[str, torch.Tensor], kind: str) -> dict[str, float]:
    return {n: float(divergence(ref.hist[n], cand[n], kind).mean()) for n in ref.hist}


def lr_factor(step: int, cfg: BNAConfig) -> float:
    """Multiplier of ``cfg.lr`` at ``step``: linear warm-up over the first ``cfg.warmup`` steps, then 1.

    Adam's first steps are about ``lr`` times the sign of the gradient for every statistic at once; on
    a trigger that shifts every layer (chessboard) a full first step at lr 0.08 raised the loss, and
    the fit never came back below its start (CHANGELOG). ``warmup = 0`` gives 1 from the first step."""
    return min(1.0, (step + 1) / (cfg.warmup + 1))


def fit_twin(model: nn.Module, target: int, x: torch.Tensor, y: torch.Tensor, sources: list[int],
             trigger: nn.Module | list[nn.Module], cfg: BNAConfig | None = None,
             aux: list[int] | tuple[int, ...] = ()) -> TwinFit:
    """Fit ``g(.|Theta_target)`` for ``model`` (a ``Classifier``, or any module; images in [0, 1]).

    ``x, y``: the defender's clean set; ``sources``: S(target); ``trigger``: the estimated trigger, or
    several variants of it (applied round-robin to the source images). ``aux``: more classes to fit on
    (those the trigger moves elsewhere); the source images are repeated to weigh as much as theirs."""
    return fit_shared_twin(model, [target], x, y, {target: sources}, trigger, cfg, aux)[0]


def fit_shared_twin(model: nn.Module, targets: list[int], x: torch.Tensor, y: torch.Tensor,
                    sources: dict[int, list[int]], trigger: nn.Module | list[nn.Module],
                    cfg: BNAConfig | None = None, aux: dict[int, list[int]] | list[int] | tuple[int, ...] = ()
                    ) -> list[TwinFit]:
    """Twins for ``targets`` that share one trigger (an all-to-all stamp): one fit of ``cfg.steps`` on the
    union of their sources, aux classes and trigger variants, with every target's clean images; then each
    target's own fit (its sources first, as ``fit_twin``, on all the group's trigger variants) for
    ``cfg.refine_steps``, starting from the shared statistics, and its flag threshold from its own clean
    images. With one target this is ``fit_twin``.
    ``aux``: the aux classes of every target (a dict), or one list for all."""
    cfg = cfg or BNAConfig()
    require_twin_layers(model)
    start = time.perf_counter()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    triggers = [t.to(x.device) for t in (trigger if isinstance(trigger, list) else [trigger])]
    aux_of = aux if isinstance(aux, dict) else {t: list(aux) for t in targets}
    if len(targets) == 1:
        t = targets[0]
        shared = _fit(model, *fit_sets(x, y, t, sources[t], aux_of[t], triggers, cfg)[:2], cfg, None, cfg.steps,
                      f"BNA target {t}")
        own = {t: shared}
    else:
        union = sorted({s for t in targets for s in sources[t]})
        union_aux = sorted({c for t in targets for c in aux_of[t]})
        shared = _fit(model, *fit_sets(x, y, targets, union, union_aux, triggers, cfg)[:2], cfg, None, cfg.steps,
                      f"BNA targets {','.join(map(str, targets))} (shared)")
        refine = replace(cfg, lr=cfg.refine_lr, warmup=0, max_fit_images=cfg.refine_fit_images)
        own = {t: _fit(model, *fit_sets(x, y, t, sources[t], aux_of[t], triggers, refine)[:2], refine, shared.final,
                       cfg.refine_steps, f"BNA target {t}") for t in targets}
    fits = []
    for t in targets:
        run = own[t]
        mean = {n: m.cpu() for n, (m, _) in run.final.items()}
        var = {n: v.cpu() for n, (_, v) in run.final.items()}
        stats = calibrate_flag(model, TwinStats(t, mean, var, 0.0, list(sources[t])), x[y == t], cfg.flag_rule,
                               cfg.flag_quantile)
        history = shared.history + run.history if run is not shared else run.history
        fits.append(TwinFit(stats, run.before, run.after, shared.init, history, time.perf_counter() - start))
        log.info("twin for target %d: loss %.4f -> %.4f in %.1f s, flag %s > %.3f", t,
                 history[0] if history else float("nan"), min(run.history, default=float("nan")),
                 fits[-1].seconds, stats.flag_rule, stats.flag_threshold)
    return fits


@dataclass(frozen=True)
class _Run:
    """One optimisation of twin statistics: the result and the per-layer divergences around it."""

    final: Stats
    before: dict[str, float]  # f's own statistics
    init: dict[str, float]  # the starting statistics (empty when given)
    after: dict[str, float]
    history: list[float]


def _fit(model: nn.Module, ref_x: torch.Tensor, cand_x: torch.Tensor, cfg: BNAConfig, start: Stats | None,
         steps: int, desc: str) -> _Run:
    """``steps`` of ``optimise`` on one pair of sets, from ``start`` (None: the statistics re-estimated on
    the candidate images)."""
    ref = clean_reference(model, ref_x, cfg)
    before = per_layer(ref, layer_histograms(model, cand_x, ref, cfg), cfg.divergence)
    top = max(before.values()) or 1.0
    weights = {n: (before[n] / top if cfg.layer_weighting else 1.0) for n in before}
    init_stats = start if start is not None else reestimate_bn(model, cand_x, cfg.chunk)
    params = TwinStatistics(init_stats, twin_layers(model)).to(cand_x.device)
    weights = {n: weights[n] for n in params.names}  # the loss sums the layers in this order
    init = {} if start is not None else per_layer(ref, layer_histograms(model, cand_x, ref, cfg, params.current()),
                                                  cfg.divergence)  # a given start was reported by its own run
    history = optimise(model, cand_x, ref, weights, params, replace(cfg, steps=steps), desc=desc)
    with torch.no_grad():
        final = {n: (m.detach(), var.detach().clamp(min=0)) for n, (m, var) in params.current().items()}
    after = per_layer(ref, layer_histograms(model, cand_x, ref, cfg, final), cfg.divergence)
    return _Run(final, before, init, after, history)


def optimise(model: nn.Module, cand_x: torch.Tensor, ref: Reference, weights: dict[str, float],
             params: TwinStatistics, cfg: BNAConfig, desc: str) -> list[float]:
    """``cfg.steps`` full-set Adam steps on the weighted divergence; leaves ``params`` at the best step's
    values and returns the loss of every step."""
    opt = torch.optim.Adam(params.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, cfg))
    history: list[float] = []
    best_loss, best = float("inf"), params.snapshot()
    for _ in tqdm(range(cfg.steps), desc=desc, unit="step", disable=not cfg.progress):
        opt.zero_grad(set_to_none=True)
        value = full_set_backward(model, cand_x, ref, weights, params.current(), cfg)
        history.append(value)
        if value < best_loss:
            best_loss, best = value, params.snapshot()
        opt.step()
        sched.step()
    params.restore(best)
    return history


def _loss(ref: Reference, hists: dict[str, torch.Tensor], weights: dict[str, float], kind: str) -> torch.Tensor:
    """The weighted sum over layers of each layer's mean divergence over its channels."""
    return sum(w * divergence(ref.hist[n], hists[n], kind).mean() for n, w in weights.items())  # type: ignore[return-value]


def full_set_backward(model: nn.Module, cand_x: torch.Tensor, ref: Reference, weights: dict[str, float],
                      stats: Stats, cfg: BNAConfig) -> float:
    """The loss over the whole candidate set and its gradient (accumulated into the statistics).

    One pass when the set fits ``cfg.chunk``; otherwise exactly, in two passes: the total histograms
    first, then per chunk the gradient of the loss through that chunk's share of them."""
    if len(cand_x) <= cfg.chunk:
        hists: dict[str, torch.Tensor] = {}

        def sink(name: str, out: torch.Tensor) -> None:
            hists[name] = soft_histogram(channel_view(out, cfg.grid), ref.bins[name], ref.widths[name], cfg.tau)

        with capture_bn_outputs(model, sink, stats):
            model(cand_x)
        loss = _loss(ref, hists, weights, cfg.divergence)
        loss.backward()
        return float(loss.detach())
    with torch.no_grad():
        totals = layer_histograms(model, cand_x, ref, cfg, stats)
    leaves = {n: h.clone().requires_grad_(True) for n, h in totals.items()}
    loss = _loss(ref, leaves, weights, cfg.divergence)
    names = list(leaves)
    grads = dict(zip(names, torch.autograd.grad(loss, [leaves[n] for n in names])))
    for i in range(0, len(cand_x), cfg.chunk):
        parts: list[torch.Tensor] = []

        def chunk_sink(name: str, out: torch.Tensor) -> None:
            h = soft_histogram(channel_view(out, cfg.grid), ref.bins[name], ref.widths[name], cfg.tau)
            parts.append((grads[name] * h).sum())

        with capture_bn_outputs(model, chunk_sink, stats):
            model(cand_x[i : i + cfg.chunk])
        # every chunk's graph ends in the same ``stats`` (computed once from the parameters): keep that
        # shared part until the last chunk has gone through it
        torch.stack(parts).sum().backward(retain_graph=i + cfg.chunk < len(cand_x))
    return float(loss.detach())


@torch.no_grad()
def calibrate_flag(model: nn.Module, stats: TwinStats, clean_target: torch.Tensor, rule: str,
                   quantile: float) -> TwinStats:
    """``stats`` with its serving rule and threshold: the ``quantile`` of ``models.twins.flag_score`` over
    the defender's clean images of the target class that ``f`` assigns to it (the only ones the gateway
    sends to the twin). With the default quantile 1.0 no calibration image is flagged; held-out clean
    images of the target are flagged at about ``1 / (n + 1)`` for ``n`` calibration images.

    Under ``margin`` the threshold is never below 0 (the plain "labels differ" rule). With no calibration
    image at all, the twin falls back to that rule (``margin`` at 0): a threshold cannot be guessed."""
    target = stats.target
    if len(clean_target):
        router = TwinRouter(model, [stats]).to(clean_target.device)
        f_logits = router.logits(clean_target)
        keep = f_logits.argmax(1) == target
        score = flag_score(rule, f_logits[keep], router.twin_logits(clean_target[keep], target), target)
    else:
        score = torch.empty(0)
    if len(score) == 0:
        log.warning("twin for target %d: no clean image of the target class that f assigns to it; "
                    "flagging by the plain 'labels differ' rule", target)
        return replace(stats, flag_rule="margin", flag_threshold=0.0)
    threshold = float(torch.quantile(score.float(), quantile))
    if rule == "margin":
        threshold = max(0.0, threshold)
    return replace(stats, flag_rule=rule, flag_threshold=threshold)
