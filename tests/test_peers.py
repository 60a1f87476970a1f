"""The peers of the benchmark (``bench/peers/``): each one, on a tiny poisoned model, must do what it is known for.

Every test fails when its defence does nothing: a model-level peer must bring the planted backdoor's
ASR down (keeping clean accuracy), a detector must flag triggered inputs far more often than its
false-alarm budget lets it flag clean ones. The tiny models are ``tests/tiny_models.py``'s (a width-8
ResNet-18 on 16x16 synthetic bars, BadNet or WaNet towards class 2), trained once per process on one
thread. Settings are cut down (fewer epochs, iterations) to keep the suite fast; where a tiny model
needs another setting than the benchmark's, the test says why.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import tiny_models as tm
from bna_gateway.mitigation.imagefolder import ImageSet
from bna_gateway.mitigation.lab.attacks import AttackSpec, build_trigger
from bna_gateway.mitigation.lab.datasets import Dataset
from bna_gateway.mitigation.lab.metrics import predict
from bna_gateway.mitigation.lab.training import TrainConfig, train_classifier
from bna_gateway.models.network import build_classifier
from bna_gateway.models.spec import InputSpec, ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from peers import anp, fp, ft, ft_sam, nc  # noqa: E402
from peers.common import FALSE_ALARM_BUDGET, FinetuneConfig, calibrate, clone, threshold_at_budget  # noqa: E402
from peers.ibd_psc import IbdPsc  # noqa: E402
from peers.report import markdown, plot_der, plot_detectors  # noqa: E402
from peers.scale_up import ScaleUp  # noqa: E402
from peers.strip import Strip  # noqa: E402


def _acc_asr(model: torch.nn.Module, m: tm.TinyModel) -> tuple[float, float]:
    test = m.data.test
    victims = test.y != tm.TARGET
    with tm.one_thread():
        acc = float((predict(model, test.x) == test.y).float().mean())
        asr = float((predict(model, m.trigger(test.x[victims])) == tm.TARGET).float().mean())
    return acc, asr


@pytest.fixture(scope="module")
def badnet() -> tm.TinyModel:
    m = tm.backdoored()
    assert _acc_asr(m.classifier, m)[1] > 0.9  # the backdoor is there to remove
    return m


def _unchanged(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


# ---------------------------------------------------------------- thresholds
def test_the_threshold_flags_at_most_the_budget_of_clean_scores_even_with_ties() -> None:
    scores = torch.cat([torch.full((30,), 1.0), torch.linspace(0, 0.9, 70)])
    t = threshold_at_budget(scores, 0.05)
    assert float((scores > t).float().mean()) <= 0.05  # 30 % tie at the top: none of them may be flagged
    s = torch.arange(100.0)
    assert float((s > threshold_at_budget(s, 0.05)).float().mean()) == pytest.approx(0.05)


# ---------------------------------------------------------------- model-level peers
def test_nc_unlearning_with_the_trigger_removes_the_backdoor_and_leaves_the_model_alone(badnet: tm.TinyModel) -> None:
    before = {k: v.clone() for k, v in badnet.classifier.state_dict().items()}
    with tm.one_thread():
        out = nc.defend(badnet.classifier, badnet.data.clean.x, badnet.data.clean.y, [badnet.trigger],
                        FinetuneConfig(epochs=20))
        untouched = nc.defend(badnet.classifier, badnet.data.clean.x, badnet.data.clean.y, [])
    acc, asr = _acc_asr(out.model, badnet)
    assert asr < 0.2 and acc > 0.9, (acc, asr)
    assert out.info["images"] == 48 + 12  # 80 % clean as they are, 20 % stamped (60 clean images)
    assert _acc_asr(untouched.model, badnet)[1] > 0.9  # no flagged target: nothing to unlearn
    assert _unchanged(before, badnet.classifier)


def test_ft_learns_from_the_defenders_clean_images(badnet: tm.TinyModel) -> None:
    # plain fine-tuning keeps this tiny model's BadNet at every setting tried (lr 0.01-0.2, up to 60 epochs,
    # poison rates 0.02-0.2, Blend, SIG, WaNet): the fine-pruning paper's finding about fine-tuning alone.
    # What FT must do is learn from the clean set: with the classifier head re-initialised it has to
    # bring clean accuracy back (and the backdoor, which lives in the features, comes back with it)
    damaged = clone(badnet.classifier)
    torch.manual_seed(0)
    damaged.net.linear.reset_parameters()
    assert _acc_asr(damaged.eval(), badnet)[0] < 0.5
    with tm.one_thread():
        out = ft.defend(damaged, badnet.data.clean.x, badnet.data.clean.y, FinetuneConfig(epochs=20))
    assert _acc_asr(out.model, badnet)[0] > 0.9
    assert out.info == {"epochs": 20, "lr": 0.1, "batch": 32, "steps": 40}  # 60 images: batch 32, 2 steps


def test_fp_prunes_the_least_active_channels_within_its_tolerance_and_they_stay_pruned(badnet: tm.TinyModel) -> None:
    x, y = badnet.data.clean.x, badnet.data.clean.y
    with tm.one_thread():
        activity = fp.channel_activity(badnet.classifier, x)
        out = fp.defend(badnet.classifier, x, y, FinetuneConfig(epochs=10))
    info = out.info
    assert 0 < info["pruned"] < info["channels"] == len(activity)
    assert info["clean_acc_after"] >= 0.9 * info["clean_acc_before"]  # BackdoorBench's acc_ratio 0.1
    dead = (out.model.net.linear.weight == 0).all(0)  # channels whose every weight is zero after fine-tuning
    assert int(dead.sum()) == info["pruned"]
    assert set(dead.nonzero().flatten().tolist()) == set(activity.argsort()[: info["pruned"]].tolist())
    assert _acc_asr(out.model, badnet)[0] > 0.9


def test_ft_sam_removes_a_backdoor_that_plain_fine_tuning_keeps(badnet: tm.TinyModel) -> None:
    # the tiny model's BadNet survives plain fine-tuning even at lr 0.2; sharpness-aware fine-tuning at the
    # same lr (and BackdoorBench's rho 2, adaptive, label smoothing 0.1) removes it: FT-SAM's claim
    cfg = FinetuneConfig(epochs=20, lr=0.2)
    with tm.one_thread():
        sam = ft_sam.defend(badnet.classifier, badnet.data.clean.x, badnet.data.clean.y, cfg)
        plain = ft.defend(badnet.classifier, badnet.data.clean.x, badnet.data.clean.y, cfg)
    acc, asr = _acc_asr(sam.model, badnet)
    assert asr < 0.2 and acc > 0.9, (acc, asr)
    assert _acc_asr(plain.model, badnet)[1] > 0.5


def test_anp_prunes_the_neurons_that_carry_the_backdoor(badnet: tm.TinyModel) -> None:
    before = {k: v.clone() for k, v in badnet.classifier.state_dict().items()}
    with tm.one_thread():
        out = anp.defend(badnet.classifier, badnet.data.clean.x, badnet.data.clean.y, anp.ANPConfig(nb_iter=100))
    acc, asr = _acc_asr(out.model, badnet)
    assert asr < 0.5 and acc > 0.9, (acc, asr, out.info)
    assert 0 < out.info["pruned_neurons"] < out.info["neurons"] // 4
    assert out.info["clean_acc_after"] >= 0.9 * out.info["clean_acc_before"]  # the threshold's accuracy rule
    assert _unchanged(before, badnet.classifier)


# ---------------------------------------------------------------- input detectors
def _rates(det, m: tm.TinyModel) -> tuple[float, float, float, float]:
    """(TPR, FPR on held-out clean, mean score triggered, mean score clean) at the 5 % budget."""
    test = m.data.test
    victims = test.y != tm.TARGET
    x, y = tm.defender_set(m)
    with tm.one_thread():
        cal = calibrate(det, m.classifier, x, y)
        assert cal.clean_flag_rate <= FALSE_ALARM_BUDGET
        s_trig, s_clean = det.score(m.trigger(test.x[victims])), det.score(test.x)
    t = cal.threshold
    return (float((s_trig > t).float().mean()), float((s_clean > t).float().mean()), float(s_trig.mean()),
            float(s_clean.mean()))


@pytest.mark.parametrize("make", [lambda: Strip(), lambda: IbdPsc()], ids=["strip", "ibd_psc"])
def test_a_detector_flags_triggered_inputs_far_beyond_its_false_alarm_budget(badnet: tm.TinyModel, make) -> None:
    tpr, fpr, _, _ = _rates(make(), badnet)
    tpr_clean_model, _, _, _ = _rates(make(), tm.clean())  # the same stamp on a model without the backdoor
    assert tpr >= 0.25 and tpr >= 3 * max(tpr_clean_model, FALSE_ALARM_BUDGET), (tpr, fpr, tpr_clean_model)
    assert fpr <= 3 * FALSE_ALARM_BUDGET, fpr


@pytest.fixture(scope="module")
def brightness() -> tm.TinyModel:
    """A tiny model whose classes are brightness levels (class c: a flat image of level in [c/4, (c+1)/4)),
    BadNet-poisoned towards class 0. SCALE-UP's premise holds here by construction: amplifying a clean image
    moves it to a brighter class, while the stamp keeps the target at every level (it was learnt on all).
    On the bars of ``tiny_models`` (and on MNIST digits) amplification changes no clean prediction."""
    g = torch.Generator().manual_seed(0)

    def images(n: int) -> ImageSet:
        y = torch.arange(4).repeat_interleave(n)
        level = (y.float() + torch.rand(len(y), generator=g)) / 4
        return ImageSet((level.view(-1, 1, 1, 1) + 0.01 * torch.randn(len(y), 1, 16, 16, generator=g)).clamp(0, 1), y)

    inp = InputSpec(shape=(1, 16, 16), mean=(0.5,), std=(0.3,))
    data = Dataset("brightness", [f"level{c}" for c in range(4)], inp, images(60), images(10), images(25))
    attack = AttackSpec(kind="badnet", target=0, poison_rate=0.2, params={"patch_size": 3})
    spec = ModelSpec(arch="resnet18", arch_kwargs={"num_classes": 4, "in_channels": 1, "width": 8}, input=inp,
                     class_names=data.class_names)
    with tm.one_thread():
        torch.manual_seed(0)
        clf, metrics, _ = train_classifier(build_classifier(spec), data, attack,
                                           TrainConfig(epochs=8, batch_size=16, lr=0.05, progress=False))
    assert metrics.asr > 0.9
    return tm.TinyModel(clf.eval(), data, attack, build_trigger(attack, (1, 16, 16)), metrics)


def test_scale_up_keeps_triggered_predictions_under_amplification_and_not_clean_ones(brightness: tm.TinyModel) -> None:
    test = brightness.data.test
    with tm.one_thread():
        det = ScaleUp().fit(brightness.classifier, brightness.data.clean.x, brightness.data.clean.y)
        trig = det.score(brightness.trigger(test.x[test.y != 0]))
        clean = det.score(test.x)
    assert float(trig.mean()) > 0.9 and float(clean.mean()) < 0.5, (float(trig.mean()), float(clean.mean()))
    assert det.forwards_per_input == 6


# ---------------------------------------------------------------- the report
def test_the_report_writes_a_table_and_both_figures(tmp_path: Path) -> None:
    results = (("vanilla", 1.0, 0.5), ("bna", 0.01, 0.99), ("ft", 0.9, 0.55))
    rows = [{"attack": a, "clean_per_class": 50, "defence": d, "acc": 0.98, "asr": asr, "der": der}
            for a in ("badnet", "wanet") for d, asr, der in results]
    dets = [{"attack": "badnet", "detector": d, "tpr": 0.9, "fpr": 0.05, "forwards_per_input": f}
            for d, f in (("bna", 1.1), ("strip", 21), ("ibd_psc", 6))]
    doc = {"commit": "abc1234", "rows": rows, "detectors": dets}
    details = {"host": {"summary": "test host"}, "checks": [{"peer": "ft", "attack": "badnet", "claim": "c",
                                                              "value": 0.9, "holds": False}]}
    text = markdown(doc, details)
    assert "| badnet | **0.990** | 0.550 |" in text  # DER matrix, best in bold
    assert "| badnet | STRIP | 0.900 | 0.050 |" in text and "**no**" in text
    for path in (plot_der(doc, tmp_path / "der.png"), plot_detectors(doc, tmp_path / "det.png")):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
