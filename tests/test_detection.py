"""Detection: MAD, the batched pair optimisation, the stages, and detection.json.

Two kinds of test:
- the stages (which pairs are flagged, targets, sources, all-to-all false-pair elimination, each family
  against its own median) on planted trigger sizes: ``detect_backdoor`` is given a table as its
  optimiser, so every branch is exercised exactly and quickly;
- the real optimiser on a tiny trained model (``tests/tiny_models.py``): every kept trigger really
  reaches the success threshold, chunking keeps the results, runs are deterministic, and
  ``bna detect``'s files read back.
"""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from bna_gateway.mitigation.detection import DetectionConfig, DetectionResult, ReverseConfig, TargetTrigger, detect_backdoor
from bna_gateway.mitigation.detection.io import read_detection, write_detection
from bna_gateway.mitigation.detection.records import (AddedSource, Elimination, FamilyEvidence, PairRecord,
                                                      Transfer)
from bna_gateway.mitigation.detection.reverse import (ReverseResult, calibrate, group_index, image_targets,
                                                      reverse_engineer, success_rate)
from bna_gateway.mitigation.detection.stages.common import sources_sharing
from bna_gateway.mitigation.detection.stages.expand import expand_sources
from bna_gateway.mitigation.detection.stages.scan import PairScan
from bna_gateway.mitigation.detection.stages.share import share_patches
from bna_gateway.mitigation.detection.stages.transfer import transfer_triggers
from bna_gateway.mitigation.detection.stages.reach import require_reach
from bna_gateway.mitigation.detection.statistic import (MAD_CONSISTENCY, all_pairs, found_scores, mad_scores,
                                                        pair_statistic, resolve_statistic, universal_scores)
from bna_gateway.mitigation.detection.suspect import Suspect
from bna_gateway.mitigation.detection.table import scores_table
from bna_gateway.mitigation.triggers import PATCH, PERTURBATION, Trigger, family

FAST = ReverseConfig(steps=40, images_per_group=4, progress=False)


# ---------------------------------------------------------------- MAD
def test_mad_scores_match_the_formula() -> None:
    stat = torch.tensor([1.0, 2.0, 3.0, 4.0, 100.0])
    med, mad = 3.0, 1.0 * MAD_CONSISTENCY  # |x - 3| = 2, 1, 0, 1, 97 -> median 1
    expected = (stat - med) / mad
    assert torch.allclose(mad_scores(stat), expected)


def test_mad_is_one_sided_and_ignores_missing_triggers() -> None:
    stat = torch.tensor([1.0, 1.1, 0.9, 1.05, 0.95, 0.01, 50.0, 0.0])
    stat[-1] = float("inf")  # pretend: no trigger found for this pair -> statistic undefined
    s = mad_scores(torch.where(torch.isinf(stat), torch.tensor(float("nan")), stat))
    assert s[6] > 7  # a very small trigger (large 1/size) is anomalous
    assert s[5] < 0  # a very large trigger is not suspicious: negative score, never flagged
    assert s[7] == 0  # undefined statistic: score 0, and it did not move the median
    assert float(mad_scores(torch.tensor([1.0, 2.0])).abs().sum()) == 0  # too few values for a MAD


def test_mad_of_identical_statistics_is_finite() -> None:
    s = mad_scores(torch.full((12,), 0.5))
    assert torch.isfinite(s).all() and float(s.abs().max()) == 0


# ---------------------------------------------------------------- groups of images
def test_group_index_pools_and_cycles_each_groups_images() -> None:
    y = torch.tensor([0, 0, 0, 1, 2, 2])
    idx = group_index(y, [[0], [1], [1, 2]])
    assert idx.shape == (3, 3)
    assert set(idx[0].tolist()) == {0, 1, 2}
    assert idx[1].tolist() == [3, 3, 3]
    assert set(idx[2].tolist()) == {3, 4, 5}
    with pytest.raises(ValueError, match=r"no clean images for source classes \[\[3\]\]"):
        group_index(y, [[0], [3]])


def test_all_pairs_are_ordered_and_complete() -> None:
    pairs = all_pairs(10)
    assert len(pairs) == 90 == len(set(pairs)) and all(s != t for s, t in pairs)


# ---------------------------------------------------------------- orchestration on planted sizes
class PlantedOptimiser:
    """Stands in for ``reverse_engineer``: the trigger size of each (sources -> target) comes from a table."""

    def __init__(self, single: dict[str, dict[tuple[int, int], float]], joint: dict[tuple[tuple[int, ...], int], float],
                 default: float = 1.0) -> None:
        self.single, self.joint, self.default = single, joint, default
        self.calls: list[tuple[str, int]] = []

    def __call__(self, model, x, y, groups, targets, fam, cfg, desc=""):  # noqa: ANN001, ANN204
        name = fam.name
        self.calls.append((name, len(groups)))
        sizes = []
        for g, t in zip(groups, targets):
            if len(g) == 1:
                sizes.append(self.single.get(name, {}).get((g[0], t), self.default))
            else:  # a joint size by (family, sources, target), or (sources, target) in every family
                key = (tuple(sorted(g)), t)
                smallest = min(self.single.get(name, {}).get((s, t), self.default) for s in g)
                sizes.append(self.joint.get((name, *key), self.joint.get(key, smallest)))
        n = len(groups)
        tensors = {"delta": torch.zeros(n, *x.shape[1:])} if name == "perturbation" else \
            {"mask": torch.zeros(n, 1, *x.shape[2:]), "pattern": torch.zeros(n, *x.shape[1:])}
        return ReverseResult(fam, torch.tensor(sizes), torch.ones(n), tensors)


def _jitter(pairs: list[tuple[int, int]], base: float, seed: int) -> dict[tuple[int, int], float]:
    g = torch.Generator().manual_seed(seed)
    noise = torch.rand(len(pairs), generator=g) * 0.4 - 0.2
    return {p: base * (1 + float(n)) for p, n in zip(pairs, noise)}


@pytest.fixture
def run_planted():  # noqa: ANN201
    k = 10
    x = torch.rand(k * 3, 1, 8, 8)
    y = torch.arange(k).repeat_interleave(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, k))

    def run(single: dict[str, dict], joint: dict | None = None, trigger_type: str = "perturbation",  # noqa: ANN202
            threshold: float = 7.0):
        fake = PlantedOptimiser(single, joint or {})
        # source expansion and trigger transfer run the real model on the planted (zero) triggers: tested on
        # their own below
        cfg = DetectionConfig(trigger_type=trigger_type, threshold=threshold, expand_sources=None,
                              transfer_success=None)
        return detect_backdoor(model, x, y, k, cfg, optimiser=fake), fake

    return run


def test_planted_all_to_one_backdoor_gives_its_target_and_every_source(run_planted) -> None:  # noqa: ANN001
    sizes = _jitter(all_pairs(10), 1.0, 0)
    for s in range(9):
        sizes[(s, 9)] = 0.2 + 0.01 * s
    res, fake = run_planted({"perturbation": sizes})
    assert res.detected_targets == [9]
    assert res.sources == {9: list(range(9))}
    flagged = {(p.source, p.target) for p in res.pairs if p.flagged}
    assert flagged == {(s, 9) for s in range(9)}
    assert all(p.score > 7 for p in res.pairs if p.flagged)
    assert len(res.pairs) == 90 and not res.eliminated
    # one universal trigger per target, all pairs in one call; then one re-estimate: the 9 sources jointly
    # and the smallest pair alone
    assert fake.calls == [("perturbation", 10), ("perturbation", 90), ("perturbation", 2)]


def test_clean_model_flags_nothing_and_skips_re_estimation(run_planted) -> None:  # noqa: ANN001
    res, fake = run_planted({"perturbation": _jitter(all_pairs(10), 1.0, 1)})
    assert res.detected_targets == [] and not any(p.flagged for p in res.pairs)
    assert max(p.score for p in res.pairs) < 7
    assert fake.calls == [("perturbation", 10), ("perturbation", 90)]


def test_threshold_is_configurable(run_planted) -> None:  # noqa: ANN001
    sizes = _jitter(all_pairs(10), 1.0, 2)
    sizes[(3, 4)] = 0.7  # mildly anomalous pair
    res, _ = run_planted({"perturbation": sizes})
    score = next(p.score for p in res.pairs if (p.source, p.target) == (3, 4))
    assert 2 < score < 7 and res.detected_targets == []
    thr = score - 1e-3
    low, _ = run_planted({"perturbation": sizes}, threshold=thr)
    assert 4 in low.detected_targets and low.threshold == pytest.approx(thr)
    assert {(p.source, p.target) for p in low.pairs if p.flagged} == {(p.source, p.target) for p in low.pairs
                                                                        if p.score > thr}


def test_a_source_that_is_easy_to_turn_into_anything_is_not_a_backdoor(run_planted) -> None:  # noqa: ANN001
    sizes = _jitter(all_pairs(10), 1.0, 7)
    for t in range(10):
        if t != 1:
            sizes[(1, t)] *= 0.25  # like MNIST's thin "1": small triggers towards every class
    for s in range(9):
        if s != 1:
            sizes[(s, 9)] = 0.2
    res, _ = run_planted({"perturbation": sizes})  # 10 classes: "auto" = the source-normalised statistic
    assert res.statistic == "source"
    assert res.detected_targets == [9]
    assert {(p.source, p.target) for p in res.pairs if p.flagged} == {(s, 9) for s in range(9) if s != 1}
    plain = mad_scores(pair_statistic(torch.tensor([sizes[p] for p in all_pairs(10)]), all_pairs(10), 10, "plain"))
    assert int((plain > 7).sum()) > 8  # with 1/size alone, the easy source's pairs would be flagged too


def test_pair_statistic_variants() -> None:
    pairs = all_pairs(3)
    size = torch.tensor([1.0, 2.0, 4.0, float("inf"), 0.5, 1.0])
    plain = pair_statistic(size, pairs, 3, "auto")  # fewer than 5 classes: plain
    assert torch.allclose(plain[[0, 1, 2, 4, 5]], 1 / size[[0, 1, 2, 4, 5]]) and torch.isnan(plain[3])
    src = pair_statistic(size, pairs, 3, "source")  # source 0 -> {1: 1, 2: 2}: median 1
    assert float(src[0]) == pytest.approx(1.0) and float(src[1]) == pytest.approx(0.5)
    assert resolve_statistic("auto", 10) == "source"
    with pytest.raises(ValueError, match="use plain, source or auto"):
        pair_statistic(size, pairs, 3, "zscore")


def test_all_to_all_keeps_true_pairs_and_eliminates_a_false_one(run_planted) -> None:  # noqa: ANN001
    sizes = _jitter(all_pairs(10), 1.0, 3)
    for c in range(10):
        sizes[(c, (c + 1) % 10)] = 0.2 + 0.005 * c  # the true all-to-all pairs c -> c+1
    sizes[(5, 7)] = 0.25  # a false pair towards target 7, whose true source is 6
    joint = {((5, 6), 7): 0.9}  # sources 5 and 6 share no trigger: the joint one is much larger
    res, _ = run_planted({"perturbation": sizes}, joint)
    assert res.detected_targets == list(range(10))
    assert res.sources == {t: [(t - 1) % 10] for t in range(10)}
    assert res.eliminated == [Elimination(5, 7, pytest.approx(0.9), pytest.approx(0.23))]
    flagged = {(p.source, p.target) for p in res.pairs if p.flagged}
    assert flagged == {(c, (c + 1) % 10) for c in range(10)}


def test_sources_sharing_one_trigger_are_kept_together(run_planted) -> None:  # noqa: ANN001
    sizes = _jitter(all_pairs(10), 1.0, 4)
    for s in (1, 2, 3):
        sizes[(s, 0)] = 0.2
    res, _ = run_planted({"perturbation": sizes}, {((1, 2, 3), 0): 0.3})  # joint barely larger: one trigger
    assert res.sources == {0: [1, 2, 3]} and not res.eliminated


def test_each_family_is_judged_against_its_own_median(run_planted) -> None:  # noqa: ANN001
    pairs = all_pairs(10)
    patch = _jitter(pairs, 20.0, 5)  # patch sizes (mask L1) live on another scale than l2 perturbations
    for s in range(9):
        if s != 4:
            patch[(s, 9)] = 3.0
    pert = _jitter(pairs, 1.0, 6)
    res, _ = run_planted({"patch": patch, "perturbation": pert}, trigger_type="both")
    # eight of nine sources agree on 9: its column is anomalous, so it is estimated from every source
    assert res.detected_targets == [9] and res.sources[9] == list(range(9))
    assert res.triggers[9].family == "patch"
    rec = next(p for p in res.pairs if (p.source, p.target) == (0, 9))
    assert rec.family == "patch" and set(rec.by_family) == {"patch", "perturbation"}
    assert rec.by_family["patch"].score > 7 > abs(rec.by_family["perturbation"].score)
    assert not res.triggers[9].alternatives  # not anomalous as a perturbation: no second estimate


def test_a_target_anomalous_in_both_families_is_estimated_in_both(run_planted) -> None:  # noqa: ANN001
    pairs = all_pairs(10)
    patch, pert = _jitter(pairs, 20.0, 7), _jitter(pairs, 1.0, 8)
    for s in range(9):  # a sinusoid (SIG) is fired by a small patch as well as by a small perturbation
        patch[(s, 9)] = 3.0
        if s < 6:
            pert[(s, 9)] = 0.2
    res, fake = run_planted({"patch": patch, "perturbation": pert}, trigger_type="both")
    trig = res.triggers[9]
    assert res.detected_targets == [9] and trig.family == "patch" and set(trig.alternatives) == {"perturbation"}
    assert set(trig.alternatives["perturbation"]) == {"delta"}
    # target scans, pair scans, then one re-estimate per family: in each, the joint trigger and the family's
    # smallest pair alone (each family gets the all-to-all test)
    assert fake.calls == [("patch", 10), ("perturbation", 10), ("patch", 90), ("perturbation", 90), ("patch", 2),
                          ("perturbation", 2)]
    assert len(trig.variants()) == 1 + 3  # the stamped patch, and the perturbation at three strengths
    assert res.as_dict()["triggers"]["9"]["also"] == ["perturbation"]


def test_many_sources_agreeing_on_one_target_is_evidence_though_no_pair_is_flagged(run_planted) -> None:
    """The outside CNN's all-to-one patch: each pair into the target only moderately small (pair scores
    under the threshold), but every source agrees, and one trigger works for all of them."""
    sizes = _jitter(all_pairs(10), 1.0, 11)
    for s in range(1, 10):
        sizes[(s, 0)] = 0.55 + 0.02 * s  # about half the typical size: each pair alone scores 3-5
    joint = {(tuple(range(1, 10)), 0): 0.7}  # one trigger for all nine sources, about as small
    res, _ = run_planted({"perturbation": sizes}, joint)
    into0 = [p for p in res.pairs if p.target == 0]
    assert max(p.score for p in into0) < 7 and not any(p.flagged for p in res.pairs)
    evidence = res.target_evidence["perturbation"]
    assert evidence.score[0] > res.target_threshold > max(z for t, z in enumerate(evidence.score) if t != 0)
    assert res.detected_targets == [0] and res.sources == {0: list(range(1, 10))}
    assert res.as_dict()["targets"]["perturbation"]["score"][0] == pytest.approx(evidence.score[0])


def test_a_naturally_easy_target_needs_a_different_trigger_per_source_and_is_dropped(run_planted) -> None:
    sizes = _jitter(all_pairs(10), 1.0, 12)
    for s in range(1, 10):
        sizes[(s, 0)] = 0.55 + 0.02 * s  # the same column as above...
    joint = {(tuple(range(1, 10)), 0): 3.0}  # ...but no one trigger serves all sources: 5x the smallest pair
    res, _ = run_planted({"perturbation": sizes}, joint)
    assert res.target_evidence["perturbation"].score[0] > res.target_threshold
    assert res.detected_targets == []
    assert {e.target for e in res.eliminated} == {0}


def test_failed_optimisations_do_not_hide_a_target(run_planted) -> None:
    """Three sources whose optimisation into the target never succeeded (size inf) still leave the
    column's median to the six that did."""
    sizes = _jitter(all_pairs(10), 1.0, 13)
    for s in range(1, 10):
        sizes[(s, 0)] = float("inf") if s in (2, 5, 7) else 0.5
    res, _ = run_planted({"perturbation": sizes}, {(tuple(range(1, 10)), 0): 0.6})
    assert 0 in res.detected_targets and res.target_evidence["perturbation"].score[0] > res.target_threshold


def test_where_a_family_succeeds_is_evidence_when_it_fails_almost_everywhere() -> None:
    """WaNet's noise mode: warps fail on nearly every pair, except into the target from every source."""
    pairs = all_pairs(10)
    inf = float("inf")
    size = torch.tensor([0.1 if t == 4 else (0.2 if (s, t) in {(0, 2), (3, 7), (8, 1), (9, 5)} else inf)
                         for s, t in pairs])
    z = found_scores(size, pairs, 10)
    assert float(z[4]) > 6 and float(z.max()) == float(z[4]) and float(torch.cat([z[:4], z[5:]]).max()) < 1.5
    # a column that succeeds everywhere where every column does is not evidence
    assert float(found_scores(torch.ones(len(pairs)), pairs, 10).max()) == 0.0
    # random successes at about 40%, one column 9 of 9 by chance: a few sigma, under the target threshold
    g = torch.Generator().manual_seed(0)
    size = torch.where(torch.rand(len(pairs), generator=g) < 0.4, 1.0, inf)
    size[[i for i, (_, t) in enumerate(pairs) if t == 2]] = 1.0
    assert 2.0 < float(found_scores(size, pairs, 10)[2]) < DetectionConfig().target_threshold


def test_a_backdoor_that_only_its_own_column_can_reverse_is_a_target(run_planted) -> None:
    sizes = {p: float("inf") for p in all_pairs(10)}
    for s, t in [(0, 2), (3, 7), (8, 1), (9, 5)]:
        sizes[(s, t)] = 0.15  # a handful of natural warps elsewhere
    for s in range(10):
        if s != 4:
            sizes[(s, 4)] = 0.1 + 0.01 * s
    res, _ = run_planted({"perturbation": sizes})
    evidence = res.target_evidence["perturbation"]
    assert evidence.found_score[4] > res.target_threshold and max(evidence.column_score) < res.target_threshold
    assert res.detected_targets == [4] and res.sources[4] == [s for s in range(10) if s != 4]
    assert res.as_dict()["targets"]["perturbation"]["found_score"][4] == pytest.approx(evidence.found_score[4])


def test_the_family_in_which_one_trigger_serves_most_sources_describes_the_target(run_planted) -> None:
    """A blend seen as a few small patches: in the patch family the sources need different patches (the
    joint one is far larger than the smallest pair's), in the perturbation family one serves them all."""
    pairs = all_pairs(10)
    patch, pert = _jitter(pairs, 20.0, 21), _jitter(pairs, 1.0, 22)
    for s in (0, 1, 2, 3, 4, 5, 6, 8, 9):
        patch[(s, 7)] = 4.0 + 0.1 * s if s in (4, 9) else 12.0
        pert[(s, 7)] = 0.5 + 0.01 * s
    joint = {("patch", (0, 1, 2, 3, 4, 5, 6, 8, 9), 7): 19.0, ("perturbation", (0, 1, 2, 3, 4, 5, 6, 8, 9), 7): 0.6}
    res, fake = run_planted({"patch": patch, "perturbation": pert}, joint, trigger_type="both")
    assert res.target_evidence["perturbation"].score[7] > res.target_threshold
    assert any(p.flagged and p.family == "patch" for p in res.pairs if p.target == 7)
    trig = res.triggers[7]
    assert res.detected_targets == [7] and trig.family == "perturbation"
    assert trig.sources == [0, 1, 2, 3, 4, 5, 6, 8, 9] and not res.eliminated
    assert fake.calls[-2:] == [("patch", 2), ("perturbation", 2)]  # each family: joint and its smallest pair


def _trigger(target: int, sources: list[int], fit: list[int]) -> TargetTrigger:
    return TargetTrigger(target, sources, "warp", {"flow": torch.zeros(2, 2, 2)}, 0.9, 1.0, 9.0, fit)


def test_a_trigger_that_moves_only_its_own_source_is_not_a_backdoor() -> None:
    present = list(range(10))
    triggers = {
        2: _trigger(2, [1], []),  # a natural pair: "1" bent into a "2", nothing else moves
        5: _trigger(5, [1, 7], [9]),  # two look-alike sources and one more class
        6: _trigger(6, [5], [0, 1, 2, 3, 4, 7, 8, 9]),  # an all-to-all trigger: every class moves somewhere
        9: _trigger(9, [0, 1, 2, 3, 5, 6, 7], []),  # an all-to-one target with most of its sources
    }
    kept, narrow = require_reach(triggers, present, DetectionConfig())
    assert sorted(kept) == [6, 9]
    assert [(n.target, n.sources, n.reach, n.needed) for n in narrow] == [(2, [1], [1], 5), (5, [1, 7], [1, 7, 9], 5)]
    assert sorted(require_reach(triggers, present, DetectionConfig(min_reach=0.0))[0]) == [2, 5, 6, 9]
    assert sorted(require_reach(triggers, present, DetectionConfig(expand_sources=None))[0]) == [2, 5, 6, 9]
    res = DetectionResult([], 7.0, "warp", kept, 0.0, {}, narrow=narrow)
    assert "target 2 (sources [1]) dropped: its warp trigger moves only classes [1]" in scores_table(res)
    assert res.as_dict()["narrow_triggers"][1] == {"target": 5, "sources": [1, 7], "reach": [1, 7, 9], "needed": 5,
                                                   "family": "warp", "score": 9.0}
    with pytest.raises(ValueError, match="between 0 and 1"):
        DetectionConfig(min_reach=1.5)


# ---------------------------------------------------------------- the real optimiser on a tiny model
@pytest.fixture(scope="module")
def tiny() -> tm.TinyModel:
    return tm.backdoored()


def test_sources_under_the_threshold_join_when_the_targets_trigger_works_on_them(tiny: tm.TinyModel) -> None:
    x, y = tiny.data.clean.x, tiny.data.clean.y
    true = tiny.trigger  # the attack's own patch, standing in for a good estimate found from source 0 alone
    trig = TargetTrigger(tm.TARGET, [0], "patch", {"mask": true.mask, "pattern": true.pattern},
                         1.0, 9.0, 10.0)
    wrong = TargetTrigger(1, [3], "patch", {"mask": torch.zeros(1, *x.shape[2:]), "pattern": torch.zeros(x.shape[1:])},
                          1.0, 0.0, 8.0)  # does nothing: no class joins target 1
    given = {tm.TARGET: trig, 1: wrong}
    with tm.one_thread():
        out, added = expand_sources(Suspect(tiny.classifier, x, y, tm.NUM_CLASSES), given,
                                    DetectionConfig(expand_sources=0.5))
    others = [c for c in range(tm.NUM_CLASSES) if c not in (0, tm.TARGET)]
    assert out[tm.TARGET].sources == sorted([0, *others])
    assert [(a.source, a.target) for a in added] == [(c, tm.TARGET) for c in others]
    assert all(a.asr >= 0.5 for a in added)
    assert out[1].sources == [3]
    assert given[tm.TARGET].sources == [0], "a stage returns new values; its input is left as it was"


class Staircase(torch.nn.Module):
    """Class k iff the mean pixel is nearest k / 10: adding 0.1 everywhere moves every class up by one,
    like an all-to-all backdoor whose pairs c -> c + 1 share one trigger."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.levels = torch.arange(k).float() / 10

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -(x.flatten(1).mean(1, keepdim=True) - self.levels).abs() * 100


def _levels(k: int, per_class: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    y = torch.arange(k).repeat_interleave(per_class)
    return (y.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous(), y


def test_a_targets_trigger_that_moves_other_classes_elsewhere_reveals_missed_targets() -> None:
    k = 6
    x, y = _levels(k)
    trig = TargetTrigger(1, [0], "perturbation", {"delta": torch.full((1, 4, 4), 0.1)}, 1.0, 0.4, 9.0)
    triggers, added = expand_sources(Suspect(Staircase(k), x, y, k), {1: trig}, DetectionConfig())
    # classes 1..4 go to 2..5, none of them a target yet: each becomes one, with its source and this trigger;
    # class 5 goes nowhere (its next level does not exist)
    assert [(a.source, a.target, a.trigger_of) for a in added] == [(c, c + 1, 1) for c in range(1, 5)]
    assert sorted(triggers) == [1, 2, 3, 4, 5] and triggers[1].sources == [0]
    # the twins learn from every class the trigger moves (0..4), not only from their one source
    assert triggers[1].fit_classes == [2, 3, 4] and triggers[2].fit_classes == [0, 3, 4]
    assert all(triggers[t].sources == [t - 1] and torch.equal(triggers[t].tensors["delta"], trig.tensors["delta"])
               for t in range(2, 6))
    text = scores_table(DetectionResult([], 7.0, "perturbation", triggers, 0.0, {}, added_sources=added))
    assert "target 2 (source 1) added: the trigger of target 1 sends 100% of class 1's clean images there" in text


def _stamp(pixels: list[int], value: float) -> dict[str, torch.Tensor]:
    mask = torch.zeros(1, 16)
    mask[0, pixels] = 1.0
    return {"mask": mask.view(1, 4, 4), "pattern": torch.full((1, 4, 4), value)}


def test_patch_targets_that_fire_each_others_sources_are_fitted_on_the_union_of_their_patches() -> None:
    k = 8
    x, y = _levels(k)
    # two partial estimates of one all-to-all stamp: different pixels, each lifts a class by one level
    one = TargetTrigger(1, [0], "patch", _stamp([0, 1], 0.8), 1.0, 2.0, 9.0)
    two = TargetTrigger(2, [1], "patch", _stamp([2, 3], 0.8), 1.0, 2.0, 9.0)
    far = TargetTrigger(5, [3], "patch", _stamp([8, 9, 10, 11, 12, 13], 0.83), 1.0, 6.0, 9.0)  # lifts by two
    out = share_patches(Suspect(Staircase(k), x, y, k), {1: one, 2: two, 5: far}, DetectionConfig())
    one, two, far = out[1], out[2], out[5]
    assert one.shared_with == [2] and two.shared_with == [1] and not far.alternatives and not far.shared_with
    union = one.alternatives["shared"]
    assert torch.equal(union["mask"], _stamp([0, 1, 2, 3], 0.8)["mask"])
    assert torch.allclose(union["pattern"][0, 0, :4], torch.full((4,), 0.8))
    assert torch.equal(two.alternatives["shared"]["mask"], union["mask"])
    assert len(one.variants()) == 2 and len(far.variants()) == 1


def test_a_trigger_can_send_each_class_of_its_pool_to_its_own_target() -> None:
    k = 6
    x, y = _levels(k)
    mapping = torch.tensor([[1, 2, 3, 4, 5, 0]])  # c -> c + 1: one trigger for all of them
    idx = torch.tensor([[0, 5, 9, 13]])
    assert image_targets(mapping, idx, y).tolist() == [[1, 2, 3, 4]]
    assert image_targets(torch.tensor([3]), idx, y).tolist() == [[3, 3, 3, 3]]
    # no size penalty (lambda 0): the trigger moves into the success region and stays there
    cfg = ReverseConfig(steps=60, images_per_group=8, init_lambda=0.0, progress=False)
    res = reverse_engineer(Staircase(k), x, y, [[0, 1, 2, 3]], mapping, PERTURBATION, cfg)
    assert float(res.asr[0]) >= cfg.success_threshold
    assert 0.04 < float(res.tensors["delta"].mean()) < 0.15  # the shared trigger: about +0.1 everywhere
    index = group_index(y, [[0, 1, 2, 3]])
    assert float(success_rate(Staircase(k), x, index, mapping, PERTURBATION, res.tensors, cfg, y)[0]) >= 0.9
    with pytest.raises(ValueError, match="per-class targets need the labels"):
        success_rate(Staircase(k), x, index, mapping, PERTURBATION, res.tensors, cfg)


def test_sources_on_which_the_smallest_pairs_trigger_works_are_not_eliminated(tiny: tm.TinyModel) -> None:
    suspect = Suspect(tiny.classifier, tiny.data.clean.x, tiny.data.clean.y, tm.NUM_CLASSES)
    true = {"mask": tiny.trigger.mask, "pattern": tiny.trigger.pattern}
    nothing = {"mask": torch.zeros_like(tiny.trigger.mask), "pattern": torch.zeros_like(tiny.trigger.pattern)}
    with tm.one_thread():
        shared = sources_sharing(suspect, tm.TARGET, PATCH, true, [1, 3, 4], DetectionConfig())
        none = sources_sharing(suspect, tm.TARGET, PATCH, nothing, [1, 3, 4], DetectionConfig())
        off = sources_sharing(suspect, tm.TARGET, PATCH, true, [1, 3, 4], DetectionConfig(expand_sources=None))
    assert shared == [1, 3, 4] and none == [] and off == []


def test_a_flagged_pairs_trigger_tightens_every_pair_it_also_works_on(tiny: tm.TinyModel) -> None:
    x, y = tiny.data.clean.x, tiny.data.clean.y
    pairs = all_pairs(tm.NUM_CLASSES)
    g = torch.Generator().manual_seed(0)
    size = 20.0 * (1 + 0.2 * torch.rand(len(pairs), generator=g))  # optimisation found only large triggers...
    tensors = {"mask": torch.zeros(len(pairs), 1, *x.shape[2:]), "pattern": torch.zeros(len(pairs), *x.shape[1:])}
    donor = pairs.index((0, tm.TARGET))  # ...except for 0 -> TARGET, where it found the attack's own patch
    size[donor] = 9.0
    tensors["mask"][donor], tensors["pattern"][donor] = tiny.trigger.mask, tiny.trigger.pattern
    scan = PairScan(pairs, ReverseResult(PATCH, size.clone(), torch.ones(len(pairs)), tensors))
    with tm.one_thread():
        scans, moved = transfer_triggers(Suspect(tiny.classifier, x, y, tm.NUM_CLASSES), {"patch": scan}, {},
                                         DetectionConfig())
    others = [c for c in range(tm.NUM_CLASSES) if c not in (0, tm.TARGET)]
    assert [(m.source, m.target, m.donor) for m in moved] == [(c, tm.TARGET, (0, tm.TARGET)) for c in others]
    assert all(m.asr >= 0.5 and m.size == 9.0 and m.size_before > 20 for m in moved)
    res = scans["patch"].result
    for c in others:
        j = pairs.index((c, tm.TARGET))
        assert float(res.size[j]) == 9.0 and torch.equal(res.tensors["mask"][j], tiny.trigger.mask)
    untouched = [i for i, (s, t) in enumerate(pairs) if t != tm.TARGET]
    assert torch.equal(res.size[untouched], size[untouched])  # a trigger that does nothing elsewhere moves nothing
    assert torch.equal(scan.result.size, size), "the input scan is left as it was"


def test_calibration_scales_a_perturbation_until_it_succeeds_on_the_whole_pool() -> None:
    class Brightness(torch.nn.Module):  # class 1 iff the mean pixel exceeds 0.5
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.flatten(1).mean(1, keepdim=True)
            return torch.cat([torch.zeros_like(m), 10 * (m - 0.5)], dim=1)

    x = torch.linspace(0.12, 0.4, 20).view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()
    index = torch.arange(20).view(1, -1)
    delta = {"delta": torch.full((1, 1, 4, 4), 0.2)}  # lifts only the brightest third over the boundary
    cfg = ReverseConfig(calibrate_scales=(1.25, 1.5, 2.0, 4.0))
    asr = success_rate(Brightness(), x, index, torch.tensor([1]), PERTURBATION, delta, cfg)
    assert float(asr) < 0.5
    out, asr2 = calibrate(Brightness(), x, torch.zeros(20, dtype=torch.long), index, torch.tensor([1]), delta, asr,
                          cfg, PERTURBATION)
    assert torch.allclose(out["delta"], 2.0 * delta["delta"])  # 1.25 and 1.5 are not enough; 2 is the first
    assert float(asr2) >= cfg.success_threshold


@pytest.mark.parametrize("name", ["patch", "perturbation"])
def test_every_kept_trigger_really_succeeds(tiny: tm.TinyModel, name: str) -> None:
    fam = family(name)
    x, y = tiny.data.clean.x, tiny.data.clean.y
    groups, targets = [[0], [1], [3, 4], [5]], [tm.TARGET, 0, tm.TARGET, 3]
    with tm.one_thread():
        res = reverse_engineer(tiny.classifier, x, y, groups, targets, fam, FAST)
        assert res.size.shape == res.asr.shape == (4,)
        found = torch.isfinite(res.size)
        assert found[0] and found[2], "the planted backdoor's pairs must be reversible"
        index = group_index(y, groups)
        for i in found.nonzero(as_tuple=True)[0].tolist():
            trig = Trigger(fam, res.one(i))
            imgs = x[index[i].unique()]
            hit = (tiny.classifier(trig(imgs)).argmax(1) == targets[i]).float().mean()
            assert float(hit) >= FAST.success_threshold - 1e-6
            assert float(res.asr[i]) == pytest.approx(float(hit), abs=1e-6)
            assert float(success_rate(tiny.classifier, x, index[i : i + 1], torch.tensor([targets[i]]), fam,
                                      {k: v[i : i + 1] for k, v in res.tensors.items()}, FAST)) == pytest.approx(float(hit))
        if name == "patch":
            assert float(res.tensors["mask"].min()) >= 0 and float(res.tensors["mask"].max()) <= 1
            assert torch.allclose(res.size[found], res.tensors["mask"][found].sum(dim=(1, 2, 3)), rtol=1e-4)
        else:
            assert torch.allclose(res.size[found], res.tensors["delta"][found].flatten(1).norm(dim=1), rtol=1e-4)


def test_optimisation_is_deterministic_and_chunking_covers_every_group(tiny: tm.TinyModel) -> None:
    x, y = tiny.data.clean.x, tiny.data.clean.y
    pairs = all_pairs(tm.NUM_CLASSES)
    groups, targets = [[s] for s, _ in pairs], [t for _, t in pairs]
    small = replace(FAST, steps=15, max_images_per_pass=8)  # 2 groups per pass
    with tm.one_thread():
        a = reverse_engineer(tiny.classifier, x, y, groups, targets, PERTURBATION, small)
        b = reverse_engineer(tiny.classifier, x, y, groups, targets, PERTURBATION, small)
    assert torch.equal(a.size, b.size) and torch.equal(a.tensors["delta"], b.tensors["delta"])
    assert a.tensors["delta"].shape == (len(pairs), *x.shape[1:])
    assert torch.isfinite(a.size).any()


TINY_DETECTION = DetectionConfig(trigger_type="both", threshold=1.5, pair=FAST, reestimate_steps=40)


@pytest.fixture(scope="module")
def tiny_detection(tiny: tm.TinyModel) -> DetectionResult:
    """The backdoored tiny model's detection, with a low threshold that flags something."""
    with tm.one_thread():
        return detect_backdoor(tiny.classifier, tiny.data.clean.x, tiny.data.clean.y, tm.NUM_CLASSES, TINY_DETECTION)


def test_bna_detect_files_read_back(tiny: tm.TinyModel, tiny_detection: DetectionResult, tmp_path: Path) -> None:
    x = tiny.data.clean.x
    res = tiny_detection
    path = write_detection(res, tmp_path)
    doc = json.loads(path.read_text())
    k = tm.NUM_CLASSES
    assert len(doc["pairs"]) == k * (k - 1)
    for p in doc["pairs"]:
        assert {"source", "target", "statistic", "score", "asr", "flagged", "by_family"} <= set(p)
        assert set(p["by_family"]) == {"patch", "perturbation"}
        assert math.isfinite(p["score"])
    assert {"pairs_patch", "pairs_perturbation", "reestimate"} <= set(doc["timings"])
    for pic in doc["pictures"]:
        assert (tmp_path / pic).stat().st_size > 1000
    assert "anomaly_scores.png" in doc["pictures"]
    assert doc["detected_targets"], "threshold 1.5 on a backdoored model must flag something"
    back = read_detection(tmp_path)
    assert doc["detected_targets"] == back.detected_targets == res.detected_targets
    assert back.as_dict() == {k: v for k, v in doc.items() if k not in ("pictures", "triggers_file")}
    for t, trig in back.triggers.items():
        assert trig.sources == res.triggers[t].sources and trig.fit_classes == res.triggers[t].fit_classes
        for name, v in res.triggers[t].tensors.items():
            assert torch.equal(trig.tensors[name], v.float())
        out = trig.module()(x[:3])
        assert out.shape == x[:3].shape and float(out.min()) >= 0 and float(out.max()) <= 1
    assert "flagged" in scores_table(back)


def _evidence(score: float) -> dict[str, FamilyEvidence]:
    return {f: FamilyEvidence(5.0, score, 0.9, 4.0) for f in ("patch", "perturbation")}


def test_estimates_in_other_families_read_back(tmp_path: Path) -> None:
    mask, pattern, delta = torch.zeros(1, 6, 6), torch.rand(1, 6, 6), torch.rand(1, 6, 6) * 0.1
    mask[:, 4:, 4:] = 1
    trig = TargetTrigger(9, [0, 1], "patch", {"mask": mask, "pattern": pattern}, 0.9, 4.0, 20.0, [2],
                         {"perturbation": {"delta": delta}})
    pair = PairRecord(0, 9, "patch", 5.0, 20.0, 0.9, 4.0, True, _evidence(20.0))
    res = DetectionResult([pair], 7.0, "both", {9: trig}, 1.0, {})
    write_detection(res, tmp_path)
    back = read_detection(tmp_path).triggers[9]
    assert back.family == "patch" and back.fit_classes == [2] and torch.equal(back.tensors["mask"], mask)
    assert set(back.alternatives) == {"perturbation"} and torch.equal(back.alternatives["perturbation"]["delta"], delta)
    assert (tmp_path / "trigger_target_9.png").stat().st_size > 1000
    assert "target 9: anomalous in the perturbation family too" in scores_table(read_detection(tmp_path))
    doc = json.loads((tmp_path / "detection.json").read_text())
    doc["triggers"]["9"]["also"] = ["perturbation", "warp"]
    (tmp_path / "detection.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"lacks the target-9 trigger estimates \['warp'\]"):
        read_detection(tmp_path)


def test_read_detection_says_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="detection file not found"):
        read_detection(tmp_path)
    (tmp_path / "detection.json").write_text(json.dumps({"triggers": {"9": {"sources": [1], "family": "patch",
                                                                            "asr": 1, "size": 1}}}))
    with pytest.raises(FileNotFoundError, match="is missing"):
        read_detection(tmp_path)


def test_scores_table_explains_eliminations_and_additions() -> None:
    pair = PairRecord(1, 9, "patch", 5.0, 9.5, 0.95, 2.0, True, _evidence(9.5))
    res = DetectionResult([pair], 7.0, "patch", {}, 0.0, {}, statistic="source",
                          eliminated=[Elimination(2, 9, float("inf"), 2.0)],
                          added_sources=[AddedSource(4, 9, 0.98, 9)],
                          transferred=[Transfer(1, 9, "patch", (0, 9), 0.86, 7.25, 2.0)])
    text = scores_table(res)
    assert "eliminated 2 -> 9: joint trigger none found vs 2.00" in text
    assert "source 4 added to target 9: its trigger sends 98%" in text
    assert "pair 1 -> 9 (patch): the trigger of 0 -> 9 also works there (86%): size 7.25 -> 2.00" in text
    assert "statistic: source, threshold 7.0" in text


def test_the_score_histogram_survives_degenerate_scores() -> None:
    from bna_gateway.mitigation.detection.pictures import score_bins

    for scores in ([2.2e14], [3.05e14, 0.0, 0.0, float("inf")], [1.0, 1.0], [], [float("nan"), 2.0]):
        edges = score_bins(scores)
        assert len(edges) == 41 and all(b > a for a, b in zip(edges, edges[1:])), scores


def test_the_universal_reach_is_read_where_measured_and_measured_only_where_needed(tiny: tm.TinyModel) -> None:
    """The transfer stage and the many-class pair choice read the reach already measured (a planted reach
    moves pairs although the planted stamps do nothing) and measure only what is missing (then the stamps
    that do nothing move nothing)."""
    from bna_gateway.mitigation.detection.stages.scan import choose_pairs
    from bna_gateway.mitigation.detection.stages.targets import TargetScan

    x, y = tiny.data.clean.x, tiny.data.clean.y
    k = tm.NUM_CLASSES
    pairs = all_pairs(k)
    blank = {"mask": torch.zeros(k, 1, *x.shape[2:]), "pattern": torch.zeros(k, *x.shape[1:])}
    targets = list(range(k))
    sources = [[c for c in range(k) if c != t] for t in targets]
    uni_size = torch.full((k,), 50.0)
    uni_size[tm.TARGET] = 4.0
    reach = torch.zeros(k, k)
    reach[tm.TARGET] = 1.0  # the target's universal stamp sends every class there
    universal = TargetScan(targets, sources, ReverseResult(PATCH, uni_size, torch.ones(k), blank), reach)
    size = torch.full((len(pairs),), 20.0)
    scan = PairScan(pairs, ReverseResult(PATCH, size, torch.ones(len(pairs)),
                                         {n: torch.zeros(len(pairs), *v.shape[1:]) for n, v in blank.items()}))
    suspect = Suspect(tiny.classifier, x, y, k)
    cfg = DetectionConfig()
    with tm.one_thread():
        _, moved = transfer_triggers(suspect, {"patch": scan}, {"patch": universal}, cfg)
        _, measured = transfer_triggers(suspect, {"patch": scan}, {"patch": replace(universal, reach=None)}, cfg)
        choice = choose_pairs(suspect, {"patch": universal}, replace(cfg, max_pairs=5, pairs_per_source=1))
    assert sorted((m.source, m.target, m.donor) for m in moved) == [(s, tm.TARGET, (-1, tm.TARGET))
                                                                    for s in range(k) if s != tm.TARGET]
    assert measured == []  # measured now: blank stamps send nothing anywhere
    assert not choice.complete and all(t == tm.TARGET for s, t in choice.pairs if s != tm.TARGET)
    assert choice.screened == 0  # every trigger's reach was known


class _MeanBrightness(torch.nn.Module):
    """A stand-in classifier: an image's class is its mean brightness, binned into ``k`` classes."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        label = (x.mean(dim=(1, 2, 3)) * (self.k - 1)).round().long().clamp(0, self.k - 1)
        return torch.nn.functional.one_hot(label, self.k).float()


def test_the_many_class_screen_stops_when_no_trigger_left_can_change_the_choice(tiny: tm.TinyModel) -> None:
    """The pair choice measures universal triggers the smallest first and stops once every source's best
    odds beat the bound (the smallness) of every trigger left; it chooses what screening all of them would."""
    from bna_gateway.mitigation.detection.stages.scan import choose_pairs
    from bna_gateway.mitigation.detection.stages.targets import TargetScan

    x, y = tiny.data.clean.x, tiny.data.clean.y
    k = tm.NUM_CLASSES
    # trigger t covers the whole image in the grey that the stand-in classifier calls t: it sends every class to t
    tensors = {"mask": torch.ones(k, 1, *x.shape[2:]),
               "pattern": (torch.arange(k).float() / (k - 1)).view(k, 1, 1, 1).expand(k, *x.shape[1:]).clone()}
    size = torch.tensor([float(10 * (t + 1)) for t in range(k)])  # trigger 0 the smallest, then 1, ...
    scan = TargetScan(list(range(k)), [[c for c in range(k) if c != t] for t in range(k)],
                      ReverseResult(PATCH, size, torch.ones(k), tensors))
    suspect = Suspect(_MeanBrightness(k), x, y, k)
    cfg = DetectionConfig(max_pairs=5, pairs_per_source=1, screen_batch=1)
    lazy = choose_pairs(suspect, {"patch": scan}, cfg)
    full = choose_pairs(suspect, {"patch": scan}, replace(cfg, screen_batch=k))
    # trigger 0 is every other source's choice; source 0's own is trigger 1, whose odds beat every bound left
    assert (lazy.screened, full.screened) == (2, k)
    assert set(lazy.pairs) == set(full.pairs) == {(0, 1)} | {(s, 0) for s in range(1, k)}
    measured = lazy.universal["patch"].reach
    assert measured is not None and bool((measured[:2] == 1.0).all()) and bool(measured[2:].isnan().all())


def test_the_many_class_pair_choice_prefers_targets_whose_universal_trigger_is_small(tiny: tm.TinyModel) -> None:
    """Large universal triggers reach every class (a tie); the pair choice goes to the small one's target."""
    from bna_gateway.mitigation.detection.stages.scan import choose_pairs, smallness
    from bna_gateway.mitigation.detection.stages.targets import TargetScan

    x, y = tiny.data.clean.x, tiny.data.clean.y
    k = tm.NUM_CLASSES
    blank = {"mask": torch.zeros(k, 1, *x.shape[2:]), "pattern": torch.zeros(k, *x.shape[1:])}
    size = torch.full((k,), 300.0)
    size[tm.TARGET], size[0] = 50.0, float("inf")
    reach = torch.ones(k, k)  # every universal trigger sends every class to its target
    scan = TargetScan(list(range(k)), [[c for c in range(k) if c != t] for t in range(k)],
                      ReverseResult(PATCH, size, torch.ones(k), blank), reach)
    assert smallness(size).tolist() == pytest.approx([0.0] + [1.0 if t != tm.TARGET else 6.0 for t in range(1, k)])
    choice = choose_pairs(Suspect(tiny.classifier, x, y, k), {"patch": scan},
                          DetectionConfig(max_pairs=5, pairs_per_source=1))
    assert not choice.complete
    assert {t for s, t in choice.pairs if s != tm.TARGET} == {tm.TARGET}


def test_the_universal_test_counts_from_its_own_threshold_and_only_with_many_classes() -> None:
    """With many classes a target's universal-trigger size is scored against the other targets' (Neural
    Cleanse's test); it makes the target a candidate above ``universal_threshold``, a natural class's
    moderately small universal trigger (between the column's 5 and 7) does not."""
    from bna_gateway.mitigation.detection.stages.score import score_targets
    from bna_gateway.mitigation.detection.stages.targets import TargetScan

    k = 25
    log_size = torch.cat([torch.linspace(5.0, 6.0, k - 2), torch.tensor([3.3, 1.0])])  # targets 23 and 24 small
    size = log_size.exp()
    z = universal_scores(size)
    natural, backdoor = k - 2, k - 1
    assert 5.0 < float(z[natural]) < 7.0 < float(z[backdoor])
    pairs = all_pairs(k)
    scans = {"patch": PairScan(pairs, ReverseResult(PATCH, torch.full((len(pairs),), 10.0), torch.ones(len(pairs)), {}))}
    universal = {"patch": TargetScan(list(range(k)), [[c for c in range(k) if c != t] for t in range(k)],
                                     ReverseResult(PATCH, size, torch.ones(k), {}))}
    cfg = DetectionConfig()

    def flagged(c: DetectionConfig) -> list[int]:
        return score_targets(scans, universal, k, c)["patch"].flagged_targets(c.target_threshold)

    assert flagged(cfg) == [backdoor]
    assert flagged(replace(cfg, universal_threshold=cfg.target_threshold)) == [natural, backdoor]
    assert flagged(replace(cfg, universal_test_classes=k + 1)) == []  # too few classes: columns alone
    evidence = score_targets(scans, universal, k, cfg)["patch"]
    assert evidence.universal_score[natural] == pytest.approx(float(z[natural]), abs=1e-3)  # reported unscaled


def test_targets_the_memory_test_drops_leave_no_flagged_pair(tiny: tm.TinyModel, tiny_detection: DetectionResult
                                                              ) -> None:
    """With a share no training set reaches and no evidence exempt, the memory test (stage 6c) drops every
    target: none is left, each is recorded as not kept, and the pairs that made it are unflagged."""
    x, y = tiny.data.clean.x, tiny.data.clean.y
    kept = tiny_detection
    with tm.one_thread():
        dropped = detect_backdoor(tiny.classifier, x, y, tm.NUM_CLASSES,
                                  replace(TINY_DETECTION, memory_min_share=0.99, memory_exempt_score=1e9))
    assert kept.detected_targets and not dropped.detected_targets
    assert set(kept.detected_targets) <= {m.target for m in dropped.memory}
    assert not any(m.kept for m in dropped.memory)
    assert not any(p.flagged for p in dropped.pairs if (p.source, p.target) in
                   {(s, t) for t, ss in kept.sources.items() for s in ss})
