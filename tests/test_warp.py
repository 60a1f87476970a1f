"""The warp trigger family (WaNet-like backdoors): the batched warp, its size, its estimates and their use.

A warp moves pixels instead of changing them, so neither a small patch nor a small additive perturbation
reproduces it: detection reverse-engineers a smooth displacement field per class pair, its size the
root-mean-square displacement in pixels.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from bna_gateway.mitigation.cli import build_parser
from bna_gateway.mitigation.detection import DetectionResult, PairRecord, ReverseConfig, TargetTrigger
from bna_gateway.mitigation.detection.config import families_for
from bna_gateway.mitigation.detection.io import read_detection, write_detection
from bna_gateway.mitigation.detection.records import FamilyEvidence
from bna_gateway.mitigation.detection.reverse import calibrate, group_index, reverse_engineer, success_rate
from bna_gateway.mitigation.detection.statistic import all_pairs, mad_scores, pair_statistic
from bna_gateway.mitigation.triggers import FAMILIES, WARP, Trigger, family_of, identity_grid, pixel_scale
from bna_gateway.mitigation.triggers.warp import WarpCandidates


def warp_images(x: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    return WARP.embed(x, {"flow": flow})


def warp_size(flow: torch.Tensor) -> torch.Tensor:
    return WARP.size({"flow": flow})

FAST = ReverseConfig(steps=60, images_per_group=4, progress=False)


def _shift(dx_px: float, dy_px: float, h: int, w: int) -> torch.Tensor:
    """[1, H, W, 2] field that samples every pixel from ``(dx, dy)`` pixels away."""
    return (torch.tensor([dx_px, dy_px]) * pixel_scale(h, w)).view(1, 1, 1, 2).expand(1, h, w, 2).clone()


# ---------------------------------------------------------------- the warp itself
def test_a_zero_field_is_the_identity_and_a_shift_moves_whole_pixels() -> None:
    x = torch.rand(2, 3, 1, 6, 9)
    assert torch.allclose(warp_images(x, torch.zeros(2, 6, 9, 2)), x, atol=1e-6)
    out = warp_images(x, _shift(1.0, 0.0, 6, 9))  # one field for both groups
    assert torch.allclose(out[..., :-1], x[..., 1:], atol=1e-5)  # each pixel now shows its right neighbour
    assert torch.allclose(out[..., -1], x[..., -1], atol=1e-5)  # the border repeats, nothing comes from outside
    down = warp_images(x, _shift(0.0, 2.0, 6, 9))
    assert torch.allclose(down[..., :-2, :], x[..., 2:, :], atol=1e-5)


def test_size_is_the_rms_displacement_in_pixels_on_any_aspect() -> None:
    h, w = 5, 12
    assert torch.allclose(warp_size(_shift(3.0, 4.0, h, w)), torch.tensor([5.0]))
    half = torch.zeros(1, h, w, 2)
    half[:, :, : w // 2] = _shift(2.0, 0.0, h, w)[:, :, : w // 2]  # half the pixels move 2 px: rms sqrt(2)
    assert torch.allclose(warp_size(half), torch.tensor([2.0 ** 0.5]))
    assert torch.allclose(identity_grid(h, w)[0, 0], torch.tensor([-1.0, -1.0]))
    assert torch.allclose(identity_grid(h, w)[-1, -1], torch.tensor([1.0, 1.0]))


def test_pair_warps_are_smooth_and_one_exported_module_matches_the_batch() -> None:
    trig = WarpCandidates((2, 10, 14), [torch.Generator().manual_seed(i) for i in range(3)])
    with torch.no_grad():
        trig.control.mul_(40)  # a few pixels, to see differences
    flow = trig.flow().detach()
    assert flow.shape == (3, 10, 14, 2)
    # bicubic from a 4 x 4 control grid: neighbouring displacements differ by far less than the field's range
    step = (flow[:, 1:] - flow[:, :-1]).abs().max()
    assert float(step) < 0.5 * float(flow.abs().max())
    x = torch.rand(1, 5, 2, 10, 14)
    batch = trig.embed(x)  # [3, 5, C, H, W]
    snap = trig.snapshot()
    assert torch.allclose(WARP.embed(x, snap), batch, atol=1e-6)
    for i in range(3):
        module = Trigger(WARP, {"flow": snap["flow"][i]})
        assert torch.allclose(module(x[0]), batch[i], atol=1e-5)
    assert torch.allclose(trig.size(), warp_size(snap["flow"]))


def test_family_of_names_each_familys_tensors() -> None:
    assert family_of({"mask": torch.zeros(1), "pattern": torch.zeros(1)}).name == "patch"
    assert family_of({"delta": torch.zeros(1)}).name == "perturbation"
    assert family_of({"flow": torch.zeros(1)}).name == "warp"
    with pytest.raises(ValueError, match="no trigger of the families"):
        family_of({"grid": torch.zeros(1)})
    assert tuple(FAMILIES) == ("patch", "perturbation", "warp")


def test_trigger_types_select_families() -> None:
    names = lambda t: tuple(f.name for f in families_for(t))  # noqa: E731
    assert names("all") == ("patch", "perturbation", "warp")
    assert names("both") == ("patch", "perturbation")
    assert names("warp") == ("warp",)
    with pytest.raises(ValueError, match="patch, perturbation, warp, both, all"):
        families_for("blend")
    args = build_parser().parse_args(["detect", "--model", "m", "--out", "o"])
    assert args.trigger_type == "all"
    assert build_parser().parse_args(["mitigate", "--model", "m", "--out", "o", "--trigger-type", "warp"]).trigger_type \
        == "warp"


def test_calibration_scales_a_warp_until_it_succeeds_on_the_whole_pool() -> None:
    class RightIsBright(torch.nn.Module):  # class 1 iff the mean pixel exceeds 0.5
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([torch.zeros_like(m), 10 * (m - 0.5)], dim=1)

    ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32).expand(20, 1, 4, 32)  # left dark, right bright
    x = (ramp + torch.linspace(-0.2, -0.06, 20).view(-1, 1, 1, 1)).clamp(0, 1).contiguous()
    index = torch.arange(20).view(1, -1)
    flow = {"flow": _shift(3.0, 0.0, 4, 32)}  # sampling 3 px to the right brightens each image a little
    cfg = ReverseConfig(calibrate_scales=(1.25, 1.5, 2.0, 3.0, 4.0))
    tgt = torch.tensor([1])
    asr = success_rate(RightIsBright(), x, index, tgt, WARP, flow, cfg)
    assert float(asr) < 0.5
    out, asr2 = calibrate(RightIsBright(), x, torch.zeros(20, dtype=torch.long), index, tgt, flow, asr, cfg, WARP)
    factor = float(out["flow"].abs().max() / flow["flow"].abs().max())
    assert factor in (1.25, 1.5, 2.0, 3.0, 4.0) and float(asr2) >= cfg.success_threshold
    smaller = [f for f in cfg.calibrate_scales if f < factor]
    for f in smaller:  # the first factor that works, not a larger one
        assert float(success_rate(RightIsBright(), x, index, tgt, WARP, {"flow": flow["flow"] * f}, cfg)) \
            < cfg.success_threshold


def test_a_warp_estimate_is_fitted_at_three_strengths() -> None:
    flow = _shift(0.3, -0.2, 8, 8)[0]
    trig = TargetTrigger(2, [0, 1], "warp", {"flow": flow}, 0.95, 0.36, 40.0)
    variants = trig.variants()
    assert len(variants) == 3 and all(v.family is WARP for v in variants)
    for v, s in zip(variants, (1.0, 2.0, 4.0)):
        assert torch.allclose(v.flow, flow * s, atol=1e-6)
        assert v.size() == pytest.approx(s * warp_size(flow.unsqueeze(0)).item(), rel=1e-5)
    x = torch.rand(4, 1, 8, 8)
    assert not torch.allclose(variants[2](x), x)


# ---------------------------------------------------------------- the statistic when most warps fail
def test_a_source_whose_warps_mostly_fail_keeps_a_statistic() -> None:
    """On a WaNet model every warp sends an image to the target: most pairs find no warp at all (65 of 90 on
    mnist5k). Such a pair counts as the largest size found, so the source's median stays finite."""
    pairs = all_pairs(10)
    size = torch.full((90,), float("inf"))
    g = torch.Generator().manual_seed(0)
    for i, (s, t) in enumerate(pairs):
        if t == 9:
            size[i] = 0.05 + 0.1 * float(torch.rand(1, generator=g))  # the backdoor: sub-pixel warps
        elif (s + t) % 4 == 0:
            size[i] = 1.5 + float(torch.rand(1, generator=g))  # a few natural pairs: a pixel or two
    stat = pair_statistic(size, pairs, 10, "source")
    into9 = torch.tensor([t == 9 for _, t in pairs])
    assert torch.isfinite(stat[into9]).all()
    scores = mad_scores(stat)
    assert bool((scores[into9] > 7).all()) and bool((scores[~into9] < 7).all())


# ---------------------------------------------------------------- detection and read-back
def test_warp_estimates_read_back_and_are_pictured(tmp_path: Path) -> None:
    flow = _shift(0.4, 0.1, 8, 8)[0]
    delta = torch.rand(1, 8, 8) * 0.1
    trig = TargetTrigger(3, [0, 1], "warp", {"flow": flow}, 0.9, 0.41, 30.0,
                         alternatives={"perturbation": {"delta": delta}})
    fams = {f: FamilyEvidence(5.0, 30.0, 0.9, 0.41) for f in FAMILIES}
    res = DetectionResult([PairRecord(0, 3, "warp", 5.0, 30.0, 0.9, 0.41, True, fams)], 7.0, "all", {3: trig}, 1.0, {})
    write_detection(res, tmp_path)
    doc = json.loads((tmp_path / "detection.json").read_text())
    back = read_detection(tmp_path).triggers
    assert doc["triggers"]["3"]["family"] == "warp" and torch.equal(back[3].tensors["flow"], flow)
    assert torch.equal(back[3].alternatives["perturbation"]["delta"], delta)
    assert len(back[3].variants()) == 6  # the warp and the perturbation, each at three strengths
    assert (tmp_path / "trigger_target_3.png").stat().st_size > 1000
    assert (tmp_path / "anomaly_scores.png").stat().st_size > 1000
    x = torch.rand(2, 1, 8, 8)
    assert torch.allclose(back[3].module()(x), warp_images(x.unsqueeze(0), flow.unsqueeze(0))[0], atol=1e-6)
    assert json.loads((tmp_path / "detection.json").read_text())["trigger_type"] == "all"


def test_a_wanet_models_pairs_into_its_target_need_far_smaller_warps_than_a_clean_models() -> None:
    """The real optimiser on tiny models: every kept warp succeeds, and the backdoor's are tiny."""
    sources = [c for c in range(tm.NUM_CLASSES) if c != tm.TARGET]
    groups, targets = [[s] for s in sources], [tm.TARGET] * len(sources)
    sizes = {}
    for name, m in (("wanet", tm.warped()), ("clean", tm.clean())):
        assert name == "clean" or m.metrics.asr >= 0.8, "the tiny WaNet model must have learnt its backdoor"
        x, y = m.data.clean.x, m.data.clean.y
        with tm.one_thread():
            res = reverse_engineer(m.classifier, x, y, groups, targets, WARP, FAST)
        index = group_index(y, groups)
        for i in torch.isfinite(res.size).nonzero(as_tuple=True)[0].tolist():
            imgs = x[index[i].unique()]
            hit = (m.classifier(Trigger(WARP, res.one(i))(imgs)).argmax(1) == tm.TARGET).float().mean()
            assert float(hit) == pytest.approx(float(res.asr[i]), abs=1e-6) and float(hit) >= 0.5
        sizes[name] = res.size
    found = torch.isfinite(sizes["wanet"])
    assert int(found.sum()) >= 4, f"the warp backdoor must be reversible from most sources: {sizes['wanet']}"
    assert float(sizes["wanet"][found].max()) < 0.3  # a fraction of a pixel
    # the clean model's pairs into the same class: larger (or no warp at all) by a factor of 3 at the median
    assert 3 * float(sizes["wanet"].median()) < float(sizes["clean"].median())
