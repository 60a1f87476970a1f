"""Detection's number format: ``auto`` picks bfloat16 only where the device multiplies it natively; the
optimiser runs the model's passes in it, and its triggers still work on the model in float32."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import tiny_models as tm
from bna_gateway.mitigation.detection import DetectionConfig, ReverseConfig
from bna_gateway.mitigation.detection import precision
from bna_gateway.mitigation.detection.precision import autocast, native_bfloat16, resolve_precision
from bna_gateway.mitigation.detection.reverse import group_index, reverse_engineer, success_rate
from bna_gateway.mitigation.triggers import PATCH, PERTURBATION, family

FAST = ReverseConfig(steps=40, images_per_group=4, progress=False)


@pytest.mark.parametrize(("flags", "expected"), [({"avx512_bf16", "avx2"}, "bfloat16"), ({"amx_bf16"}, "bfloat16"),
                                                  ({"bf16", "asimd"}, "bfloat16"), ({"avx512f", "avx2"}, "float32"),
                                                  (set(), "float32")])
def test_auto_is_bfloat16_only_on_a_cpu_that_multiplies_it_natively(monkeypatch: pytest.MonkeyPatch,
                                                                    flags: set[str], expected: str) -> None:
    monkeypatch.setattr(precision, "_cpu_flags", lambda: flags)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("float32", "cpu") == "float32"  # a named format is taken as it is
    assert resolve_precision("bfloat16", "cpu") == "bfloat16"


def test_unknown_formats_are_refused_with_the_accepted_ones() -> None:
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        resolve_precision("float16", "cpu")
    with pytest.raises(ValueError, match="auto, float32, bfloat16"):
        DetectionConfig(precision="fp32")
    with pytest.raises(ValueError, match="resolves 'auto'"):
        ReverseConfig(precision="auto")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        autocast("auto", "cpu")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        autocast("float16", "cpu")


def test_the_resolved_format_reaches_every_optimiser() -> None:
    cfg = DetectionConfig().for_device("cpu")
    want = "bfloat16" if native_bfloat16("cpu") else "float32"
    assert cfg.precision == cfg.pair.precision == cfg.target.precision == cfg.reestimate().precision == want
    assert cfg.target_for(10).precision == cfg.pair_for(PATCH).precision == want
    pinned = DetectionConfig(precision="float32").for_device("cpu")
    assert pinned.pair.precision == pinned.target.precision == "float32"


def test_autocast_runs_the_passes_in_bfloat16_and_float32_untouched() -> None:
    layer = torch.nn.Linear(4, 3)
    x = torch.rand(2, 4)
    with autocast("bfloat16", "cpu"):
        assert layer(x).dtype == torch.bfloat16
    with autocast("float32", "cpu"):
        assert layer(x).dtype == torch.float32


@pytest.mark.parametrize("name", ["patch", "perturbation"])
def test_bfloat16_triggers_are_found_and_work_on_the_model_in_float32(name: str) -> None:
    tiny = tm.backdoored()
    fam = family(name)
    x, y = tiny.data.clean.x, tiny.data.clean.y
    groups, targets = [[0], [1], [3, 4], [5]], [tm.TARGET, 0, tm.TARGET, 3]
    cfg = replace(FAST, precision="bfloat16")
    with tm.one_thread():
        res = reverse_engineer(tiny.classifier, x, y, groups, targets, fam, cfg)
        again = reverse_engineer(tiny.classifier, x, y, groups, targets, fam, cfg)
        full = reverse_engineer(tiny.classifier, x, y, groups, targets, fam, FAST)
    assert torch.equal(res.size, again.size), "a bfloat16 run is as deterministic as a float32 one"
    assert bool(torch.isfinite(res.size[[0, 2]]).all()), "the planted backdoor's pairs must be reversible"
    # the same optimisation, the same triggers: every group's kept size within 10% of float32's
    assert torch.equal(torch.isfinite(res.size), torch.isfinite(full.size))
    found = torch.isfinite(full.size)
    assert torch.allclose(res.size[found], full.size[found], rtol=0.1)
    index = group_index(y, groups)
    for i in torch.isfinite(res.size).nonzero(as_tuple=True)[0].tolist():
        one = {k: v[i : i + 1] for k, v in res.tensors.items()}
        hit = float(success_rate(tiny.classifier, x, index[i : i + 1], torch.tensor([targets[i]]), fam, one, FAST))
        assert hit >= 0.5, f"group {i}: the bfloat16 trigger sends only {hit:.2f} of its images in float32"
        assert hit == pytest.approx(float(res.asr[i]), abs=0.15)


def test_detection_records_its_format() -> None:
    from bna_gateway.mitigation.detection import detect_backdoor

    tiny = tm.backdoored()
    cfg = DetectionConfig(trigger_type="perturbation", pair=replace(FAST, steps=5), target=replace(FAST, steps=5),
                          reestimate_steps=5, precision="float32")
    with tm.one_thread():
        res = detect_backdoor(tiny.classifier, tiny.data.clean.x, tiny.data.clean.y, tm.NUM_CLASSES, cfg)
    assert res.precision == "float32" and res.as_dict()["precision"] == "float32"
    assert PERTURBATION.name in {k.split("_", 1)[1] for k in res.timings if k.startswith("pairs_")}
