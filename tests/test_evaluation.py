"""`bna evaluate`'s figures on the tiny BadNet model: overall, per source class, DER, clean identity."""
from __future__ import annotations

import pytest

import tiny_models as tm
from bna_gateway.mitigation.evaluation import evaluate_bundle
from bna_gateway.models.bundle import DetectionSummary, LoadedBundle, Manifest


def _bundle(m: tm.TinyModel, twins: list) -> LoadedBundle:  # noqa: ANN001
    manifest = Manifest(model=tm.SPEC, detection=DetectionSummary(detected_targets=[t.target for t in twins],
                                                                   threshold=7.0))
    return LoadedBundle(manifest, m.classifier, twins)


@pytest.fixture(scope="module")
def mitigated() -> dict:
    m = tm.backdoored()
    with tm.one_thread():
        return evaluate_bundle(_bundle(m, [tm.twin_fit().stats]), m.attack, m.data.test).as_dict()


def test_the_gateway_removes_the_backdoor_and_says_so_per_source_class(mitigated: dict) -> None:
    v, g = mitigated["vanilla"], mitigated["mitigated"]
    # BNA's efficacy bar is test_bna's, averaged over five models; here one model, so a looser one
    assert v["asr"] >= 0.9 and g["asr"] <= 0.25 and g["sia"] >= 0.75 and g["acc"] >= v["acc"] - 0.05
    assert mitigated["der"] == pytest.approx((max(0, v["asr"] - g["asr"]) - max(0, v["acc"] - g["acc"]) + 1) / 2)
    rows = mitigated["per_source_class"]
    assert [r["class"] for r in rows] == [c for c in range(tm.NUM_CLASSES) if c != tm.TARGET]
    assert all(r["targets"] == [tm.TARGET] and r["f_asr"] >= 0.8 and r["asr"] <= r["f_asr"] for r in rows)
    n = sum(r["n"] for r in rows)
    assert n == mitigated["n_triggered"]
    assert sum(r["asr"] * r["n"] for r in rows) / n == pytest.approx(g["asr"], abs=1e-3)
    assert sum(r["sia"] * r["n"] for r in rows) / n == pytest.approx(g["sia"], abs=1e-3)
    assert mitigated["trigger_detection"]["tpr"] >= 0.75 and mitigated["true_targets"] == [tm.TARGET]
    # of the triggered images f gives the target, at least as large a share is flagged (the others are
    # only flagged when f sent them to the target anyway: a triggered image f keeps right is never checked)
    det = mitigated["trigger_detection"]
    assert det["tpr_when_f_fooled"] >= det["tpr"] - 1e-9


def test_without_twins_the_gateway_is_f() -> None:
    m = tm.backdoored()
    with tm.one_thread():
        doc = evaluate_bundle(_bundle(m, []), m.attack, m.data.test).as_dict()
    assert doc["outputs_identical_to_f_on_clean"] and doc["detected_targets"] == []
    assert doc["mitigated"] == doc["vanilla"]
    assert all(r["asr"] == r["f_asr"] for r in doc["per_source_class"])
    assert doc["trigger_detection"]["tpr"] == 0.0 and doc["trigger_detection"]["fpr"] == 0.0
    assert doc["trigger_detection"]["tpr_when_f_fooled"] == 0.0
