"""One batched optimisation that reverse-engineers a trigger for many (sources -> target) groups at once.

Each group ``g`` has a target class and a pool of clean images (one source class, or all of S(t)).
Every step draws ``images_per_group`` images of every group, embeds the group's candidate trigger,
and runs ONE forward/backward through the frozen model for all groups together. Lambda, the weight of
the trigger-size penalty, adapts per group (Neural Cleanse's schedule) so that attack success stays
above ``success_threshold`` while the trigger shrinks. The smallest successful trigger is kept.
docs/method.md#detection.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from bna_gateway.mitigation.detection.config import ReverseConfig
from bna_gateway.mitigation.detection.precision import autocast
from bna_gateway.mitigation.triggers import CandidateTriggers, Tensors, TriggerFamily

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReverseResult:
    """The kept trigger of every group of one optimisation."""

    family: TriggerFamily
    size: torch.Tensor  # [G] size of the best successful trigger (inf when none succeeded)
    asr: torch.Tensor  # [G] attack success of the kept trigger on all of the group's images
    tensors: dict[str, torch.Tensor]  # best trigger per group, e.g. mask [G,1,H,W] + pattern [G,C,H,W]

    def one(self, i: int) -> dict[str, torch.Tensor]:
        """Group ``i``'s trigger tensors (no group dimension)."""
        return {k: v[i] for k, v in self.tensors.items()}


@dataclass(frozen=True)
class Pools:
    """The clean images of each group: ``index`` [G, L] (padded by repeating), ``length`` [G] valid columns."""

    index: torch.Tensor
    length: torch.Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])

    def rows(self, start: int, stop: int) -> "Pools":
        return Pools(self.index[start:stop], self.length[start:stop])

    def capped(self, n: int) -> "Pools":
        """At most ``n`` images of each group, evenly spaced over its pool (all of a smaller pool)."""
        if int(self.length.max()) <= n:
            return self
        length = self.length.clamp(max=n)
        pos = torch.arange(n).unsqueeze(0) * self.length.unsqueeze(1) // length.unsqueeze(1)
        pos = torch.minimum(pos, (self.length - 1).unsqueeze(1))
        return Pools(self.index.gather(1, pos), length)


def group_pools(y: torch.Tensor, groups: list[list[int]]) -> Pools:
    """Each group's pooled image indices (its classes' images, in index order)."""
    pools = [torch.cat([(y == c).nonzero(as_tuple=True)[0] for c in classes]) for classes in groups]
    if any(p.numel() == 0 for p in pools):
        empty = [g for g, p in zip(groups, pools) if p.numel() == 0]
        raise ValueError(f"no clean images for source classes {empty}")
    length = max(p.numel() for p in pools)
    index = torch.stack([p.repeat((length + p.numel() - 1) // p.numel())[:length] for p in pools])
    return Pools(index, torch.tensor([p.numel() for p in pools]))


def group_index(y: torch.Tensor, groups: list[list[int]]) -> torch.Tensor:
    """[G, L] image indices per group (classes pooled), cycled to a common length L."""
    return group_pools(y, groups).index


def group_seed(seed: int, family: TriggerFamily, sources: list[int], target: object) -> int:
    """The seed of one group's random draws: a function of (seed, family, sources, target) alone, so a
    group's result does not depend on which groups share its batch, chunk or worker."""
    key = f"{seed}|{family.name}|{sorted(sources)}|{target}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def image_targets(targets: torch.Tensor, idx: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """[G, B] target of every image ``idx[g, b]``: ``targets[g]`` ([G]), or ``targets[g, y[idx]]`` when
    ``targets`` is a per-class mapping [G, K] (one trigger that sends each class somewhere else: all-to-all)."""
    if targets.dim() == 1:
        return targets.to(idx.device).unsqueeze(1).expand(idx.shape)
    if y is None:
        raise ValueError("per-class targets need the labels y")
    return targets.to(idx.device).gather(1, y.to(idx.device)[idx])


class LambdaSchedule:
    """Neural Cleanse's per-group weight of the size penalty: 0 until a group first succeeds, then
    ``init_lambda``; raised after ``patience`` successful steps in a row, lowered after as many failures."""

    def __init__(self, n_groups: int, cfg: ReverseConfig, device: torch.device) -> None:
        self.cfg = cfg
        self.value = torch.zeros(n_groups, device=device)
        self.started = torch.zeros(n_groups, dtype=torch.bool, device=device)
        self.up = torch.zeros(n_groups, device=device)
        self.down = torch.zeros(n_groups, device=device)

    def update(self, ok: torch.Tensor, rows: torch.Tensor) -> None:
        """One step's outcome ``ok`` for the groups ``rows`` (the others keep their state)."""
        cfg = self.cfg
        value, started, up, down = self.value[rows], self.started[rows], self.up[rows], self.down[rows]
        value = torch.where(ok & ~started, torch.full_like(value, cfg.init_lambda), value)
        started = started | ok
        up = torch.where(ok & started, up + 1, torch.zeros_like(up))
        down = torch.where(~ok & started, down + 1, torch.zeros_like(down))
        raise_, lower = up >= cfg.patience, down >= cfg.patience
        value = torch.where(raise_, value * cfg.lambda_up, value)
        value = torch.where(lower, value / cfg.lambda_down, value)
        self.value[rows], self.started[rows] = value, started
        self.up[rows] = torch.where(raise_, torch.zeros_like(up), up)
        self.down[rows] = torch.where(lower, torch.zeros_like(down), down)


class BestTriggers:
    """The smallest trigger of each group that succeeded on its step's images (Neural Cleanse keeps the
    trigger after the step whose success it measured: docs/method.md#detection), and when it last
    improved, for early stopping."""

    def __init__(self, candidates: CandidateTriggers, n_groups: int, device: torch.device) -> None:
        self.size = torch.full((n_groups,), float("inf"), device=device)
        self.improved_at = torch.zeros(n_groups, dtype=torch.long, device=device)
        self.tensors = candidates.snapshot()

    def offer(self, candidates: CandidateTriggers, rows: torch.Tensor, ok: torch.Tensor, step: int,
              tolerance: float) -> None:
        size = candidates.size(rows).detach()
        better = ok & (size < self.size[rows])
        if better.any():
            snap = candidates.snapshot(rows[better])
            for k in self.tensors:
                self.tensors[k][rows[better]] = snap[k]
            gain = better & (size < self.size[rows] * (1 - tolerance))
            self.improved_at[rows[gain]] = step
            self.size[rows[better]] = size[better]

    def converged(self, step: int, patience: int) -> torch.Tensor:
        """[G] groups that succeeded and have not shrunk by the tolerance for ``patience`` steps."""
        if patience <= 0:
            return torch.zeros_like(self.improved_at, dtype=torch.bool)
        return torch.isfinite(self.size) & (step - self.improved_at >= patience)

    def finish(self, candidates: CandidateTriggers) -> dict[str, torch.Tensor]:
        """Groups that never succeeded keep their final trigger, for the record."""
        never = torch.isinf(self.size)
        if never.any():
            snap = candidates.snapshot(never.nonzero(as_tuple=True)[0])
            for k in self.tensors:
                self.tensors[k][never] = snap[k]
        return self.tensors


def _logits(model: nn.Module, images: torch.Tensor, cfg: ReverseConfig) -> torch.Tensor:
    """The model's float32 logits on ``images``, its pass run in ``cfg.precision`` (precision.py)."""
    with autocast(cfg.precision, images.device):
        return model(images).float()


def _draw_orders(pools: Pools, generators: list[torch.Generator]) -> torch.Tensor:
    """[G, L] each group's own random order of its pool (positions < its length), from its generator."""
    width = pools.index.shape[1]
    order = torch.zeros(len(pools), width, dtype=torch.long)
    for g, (n, gen) in enumerate(zip(pools.length.tolist(), generators)):
        order[g, :n] = torch.randperm(n, generator=gen)
    return order


def _optimise_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pools: Pools, targets: torch.Tensor,
                    family: TriggerFamily, cfg: ReverseConfig, generators: list[torch.Generator],
                    bar: tqdm) -> tuple[dict[str, torch.Tensor], int]:
    """``cfg.steps`` batched steps over the groups of ``pools``; the kept trigger of every group, and the
    number of group-steps run (groups that converge stop early: ``cfg.stop_patience``)."""
    device = x.device
    n_groups = len(pools)
    b = min(cfg.images_per_group, int(pools.length.min()))
    cand = family.candidates(tuple(x.shape[1:]), generators).to(device)
    order = _draw_orders(pools, generators).to(device)
    index, length = pools.index.to(device), pools.length.to(device)
    opt = torch.optim.Adam(cand.parameters(), lr=cfg.lr(family), betas=(0.5, 0.9))
    lam = LambdaSchedule(n_groups, cfg, device)
    best = BestTriggers(cand, n_groups, device)
    active = torch.ones(n_groups, dtype=torch.bool, device=device)
    group_steps = 0
    for step in range(cfg.steps):
        rows = active.nonzero(as_tuple=True)[0]
        if rows.numel() == 0:
            break
        group_steps += int(rows.numel())
        pos = (torch.arange(b, device=device) + step * b).unsqueeze(0) % length[rows].unsqueeze(1)  # [A, B]
        idx = index[rows.unsqueeze(1), order[rows.unsqueeze(1), pos]]
        tgt = image_targets(targets.to(device)[rows], idx, y).flatten()
        logits = _logits(model, cand.embed(x[idx], rows).flatten(0, 1), cfg)
        ce = F.cross_entropy(logits, tgt, reduction="none").view(-1, b).mean(1)
        loss = (ce + lam.value[rows] * cand.normalised_size(rows)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():  # success measured before the step, the trigger kept after it (NC's order)
            ok = (logits.argmax(1) == tgt).float().view(-1, b).mean(1) >= cfg.success_threshold
            best.offer(cand, rows, ok, step, cfg.stop_tolerance)
            lam.update(ok, rows)
            active &= ~best.converged(step, cfg.stop_patience)
        bar.update(1)
    return best.finish(cand), group_steps


def _run_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pools: Pools, targets: torch.Tensor,
               family: TriggerFamily, cfg: ReverseConfig, generators: list[torch.Generator],
               bar: tqdm) -> tuple[ReverseResult, int]:
    best, group_steps = _optimise_chunk(model, x, y, pools, targets, family, cfg, generators, bar)
    check = pools.capped(cfg.success_images)  # a pooled universal trigger's pool can be thousands of images
    asr = success_rate(model, x, check, targets, family, best, cfg, y)
    if family.scalable and cfg.calibrate_scales:
        best, asr = calibrate(model, x, y, check, targets, best, asr, cfg, family)
    size = family.size(best)
    # a trigger that does not really succeed on the whole pool is not a small trigger
    size = torch.where(asr >= 0.5, size, torch.full_like(size, float("inf")))
    return ReverseResult(family, size.cpu(), asr.cpu(), {k: v.cpu() for k, v in best.items()}), group_steps


def calibrate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, pools: Pools | torch.Tensor, targets: torch.Tensor,
              best: dict[str, torch.Tensor], asr: torch.Tensor, cfg: ReverseConfig, family: TriggerFamily
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Scale each group's trigger by the smallest of ``cfg.calibrate_scales`` that reaches
    ``success_threshold`` on its pool (unscaled when none does, or when it already does)."""
    done = asr >= cfg.success_threshold
    scale = torch.ones_like(asr)
    for factor in sorted(f for f in cfg.calibrate_scales if f > 1.0):
        if bool(done.all()):
            break
        a = success_rate(model, x, pools, targets, family, family.scaled(best, factor), cfg, y)
        take = ~done & (a >= cfg.success_threshold)
        scale = torch.where(take, torch.full_like(scale, factor), scale)
        asr = torch.where(take, a, asr)
        done |= take
    return family.scaled(best, scale), asr


@torch.no_grad()
def prediction_fractions(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, family: TriggerFamily,
                         tensors: Tensors, cfg: ReverseConfig) -> torch.Tensor:
    """[T, K, K]: for each of T triggers and each true class c, the fraction of c's images (with the
    trigger embedded) that the model assigns to each class. Triggers and images batched, chunked."""
    device = x.device
    n_trig = next(iter(tensors.values())).shape[0]
    counts = torch.zeros(n_trig, num_classes, num_classes, device=device)
    onehot_y = F.one_hot(y.to(device), num_classes).float()  # [N, K]
    per_pass = max(1, cfg.max_images_per_pass // max(1, n_trig))
    for start in range(0, x.shape[0], per_pass):
        xt = family.embed(x[start : start + per_pass].unsqueeze(0), tensors)  # [T, B, C, H, W]
        pred = _logits(model, xt.flatten(0, 1), cfg).argmax(1).view(n_trig, -1)
        counts += torch.einsum("nc,tnk->tck", onehot_y[start : start + per_pass], F.one_hot(pred, num_classes).float())
    return counts / onehot_y.sum(0).clamp(min=1).view(1, -1, 1)


@torch.no_grad()
def success_rate(model: nn.Module, x: torch.Tensor, pools: Pools | torch.Tensor, targets: torch.Tensor,
                 family: TriggerFamily, tensors: Tensors, cfg: ReverseConfig, y: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """Attack success of each group's trigger on every image of its pool (each image once; batched,
    chunked). ``pools``: ``Pools``, or a plain [G, L] index (every column counts). ``targets``: [G],
    or a per-class mapping [G, K] (then ``y`` gives each image's class)."""
    if not isinstance(pools, Pools):
        pools = Pools(pools, torch.full((pools.shape[0],), pools.shape[1]))
    device = x.device
    n_groups, width = pools.index.shape
    hits = torch.zeros(n_groups, device=device)
    length = pools.length.to(device)
    cols_per_pass = max(1, cfg.max_images_per_pass // n_groups)
    for start in range(0, int(length.max()), cols_per_pass):
        idx = pools.index[:, start : start + cols_per_pass].to(device)
        valid = (torch.arange(start, start + idx.shape[1], device=device).unsqueeze(0) < length.unsqueeze(1))
        pred = _logits(model, family.embed(x[idx], tensors).flatten(0, 1), cfg).argmax(1).view(n_groups, -1)
        hits += ((pred == image_targets(targets, idx, y)) & valid).float().sum(1)
    return hits / length


@dataclass(frozen=True)
class Chunk:
    """A fixed slice of one ``reverse_engineer`` call's groups, optimised as one batch: the unit of work
    that runs here or on a worker (``sharding.py``). Its groups' generators are seeded afresh from
    ``seeds``, so a chunk's result depends on nothing but the chunk."""

    pools: Pools
    targets: torch.Tensor  # [g] or a per-class mapping [g, K]
    seeds: list[int]  # group_seed of each group

    def generators(self) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(s) for s in self.seeds]


def plan_chunks(y: torch.Tensor, groups: list[list[int]], targets: list[int] | torch.Tensor, family: TriggerFamily,
                cfg: ReverseConfig) -> list[Chunk]:
    """The canonical chunks of a call: ``per_chunk`` groups each, so that one pass holds at most
    ``max_images_per_pass`` images; the same whoever runs them."""
    pools = group_pools(y.cpu(), groups)
    tgt = torch.as_tensor(targets, dtype=torch.long)
    seeds = [group_seed(cfg.seed, family, g, t.tolist()) for g, t in zip(groups, tgt)]
    per_chunk = max(1, cfg.max_images_per_pass // max(1, min(cfg.images_per_group, int(pools.length.min()))))
    return [Chunk(pools.rows(s, s + per_chunk), tgt[s : s + per_chunk], seeds[s : s + per_chunk])
            for s in range(0, len(groups), per_chunk)]


def freeze(model: nn.Module) -> nn.Module:
    """The model as every optimisation needs it: evaluation mode, no gradient for its weights."""
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def run_chunk(model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunk: Chunk, family: TriggerFamily,
              cfg: ReverseConfig, bar: tqdm) -> tuple[ReverseResult, int]:
    """One chunk's kept triggers (on the CPU) and its number of group-steps."""
    return _run_chunk(model, x, y, chunk.pools, chunk.targets, family, cfg, chunk.generators(), bar)


def merge_results(family: TriggerFamily, results: list[ReverseResult]) -> ReverseResult:
    """The chunks' results, concatenated in chunk order (= group order)."""
    return ReverseResult(
        family,
        torch.cat([r.size for r in results]),
        torch.cat([r.asr for r in results]),
        {k: torch.cat([r.tensors[k] for r in results]) for k in results[0].tensors},
    )


def reverse_engineer(model: nn.Module, x: torch.Tensor, y: torch.Tensor, groups: list[list[int]],
                     targets: list[int] | torch.Tensor, family: TriggerFamily, cfg: ReverseConfig,
                     desc: str = "reverse") -> ReverseResult:
    """Reverse-engineer one trigger per group (sources ``groups[i]`` -> ``targets[i]``), batched.

    ``targets`` may also be a per-class mapping [G, K]: group i's images of class c go to ``targets[i, c]``.
    Groups are processed in chunks so that one pass holds at most ``max_images_per_pass`` images; each
    group's random draws come from its own seed (``group_seed``), so the result of a group does not
    depend on the others.
    """
    freeze(model)
    chunks = plan_chunks(y, groups, targets, family, cfg)
    results, group_steps = [], 0
    with tqdm(total=cfg.steps * len(chunks), desc=desc, unit="step", disable=not cfg.progress) as bar:
        for chunk in chunks:
            r, n = run_chunk(model, x, y, chunk, family, cfg, bar)
            results.append(r)
            group_steps += n
    log.debug("%s: %d groups, %d group-steps of %d", desc, len(groups), group_steps, cfg.steps * len(groups))
    return merge_results(family, results)
