"""`bna train` as a user runs it: the model directory it writes, and one-line errors for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BNA = Path(sys.executable).parent / "bna"
REPO = Path(__file__).resolve().parents[1]
# one thread per process: on a small shared machine, torch's default thread pool slows tiny models ~10x
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# 3 epochs of the default batch size (128) is only 6 optimiser steps on the small synthetic set, which
# is not reliably enough to learn it; small batches give 3 epochs enough steps
TRAIN_ARGS = ["--dataset", "synthetic", "--arch", "resnet18", "--attack", "badnet", "--target", "1",
              "--epochs", "3", "--batch-size", "16", "--lr", "0.05", "--device", "cpu", "--quiet"]


def bna(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BNA), *args], capture_output=True, text=True, timeout=timeout, env=ENV, cwd=REPO)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("train") / "model"
    proc = bna("train", *TRAIN_ARGS, "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_train_writes_a_model_directory(trained) -> None:  # noqa: ANN001
    out, _ = trained
    for name in ("weights.safetensors", "model.json", "attack.json", "metrics.json"):
        assert (out / name).is_file(), f"{name} missing"
    model = json.loads((out / "model.json").read_text())
    assert model["arch"] == "resnet18"
    assert model["class_names"] == ["class0", "class1", "class2", "class3"]
    assert model["input"]["shape"] == [1, 16, 16]
    assert model["dataset"]["name"] == "synthetic"
    attack = json.loads((out / "attack.json").read_text())
    assert (attack["kind"], attack["target"], attack["mode"]) == ("badnet", 1, "a2o")
    assert attack["params"]["patch_size"] == 3, "attack.json records the resolved trigger parameters"


def test_train_metrics_are_fractions_and_the_set_is_learnt(trained) -> None:  # noqa: ANN001
    out, proc = trained
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("acc", "asr", "sia"):
        assert isinstance(metrics[key], float) and 0.0 <= metrics[key] <= 1.0, key
    assert metrics["acc"] >= 0.95, f"the synthetic set should be learnt in 3 epochs: {metrics}"
    printed = json.loads(proc.stdout.strip().splitlines()[-1])
    assert printed["out"] == str(out)
    assert printed["acc"] == metrics["acc"]


def test_model_directory_reloads_to_the_same_accuracy(trained) -> None:  # noqa: ANN001
    from bna_gateway.mitigation.lab.datasets import load_ref
    from bna_gateway.mitigation.lab.metrics import predict
    from bna_gateway.mitigation.modeldir import load_model_dir

    out, _ = trained
    loaded = load_model_dir(out)
    assert loaded.attack is not None and loaded.attack.kind == "badnet"
    test = load_ref(loaded.spec.dataset).test
    acc = float((predict(loaded.classifier, test.x) == test.y).float().mean())
    metrics = json.loads((out / "metrics.json").read_text())
    assert acc == pytest.approx(metrics["acc"], abs=1e-6)


BAD_INPUT = [
    (["--dataset", "synthetic", "--attack", "trojan"], "unknown attack 'trojan'"),
    (["--dataset", "synthetic", "--attack", "badnet", "--target", "4"], "--target 4 is not a class"),
    (["--dataset", "imagefolder"], "--data-root"),
    (["--dataset", "synthetic", "--attack-param", "patchsize=3"], "no parameter(s) ['patchsize']"),
]
BAD_IDS = ["unknown-attack", "target-out-of-range", "imagefolder-without-root", "unknown-param"]


def check_one_line_error(stderr: str, message: str) -> None:
    assert "Traceback" not in stderr
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("bna train: error: ")
    assert message in lines[0]


def test_bad_input_exits_2_with_one_line(tmp_path: Path) -> None:
    args, message = BAD_INPUT[0]
    proc = bna("train", *args, "--epochs", "1", "--quiet", "--out", str(tmp_path / "m"))
    assert proc.returncode == 2, proc.stderr
    check_one_line_error(proc.stderr, message)
    assert not (tmp_path / "m").exists(), "nothing is written for bad input"


@pytest.mark.parametrize(("args", "message"), BAD_INPUT, ids=BAD_IDS)
def test_bad_input_is_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str],
                                       message: str) -> None:
    """The same entry point as the console script, in-process (a subprocess per case is slow)."""
    from bna_gateway.mitigation.cli import main

    assert main(["train", *args, "--epochs", "1", "--quiet", "--out", str(tmp_path / "m")]) == 2
    check_one_line_error(capsys.readouterr().err, message)
    assert not (tmp_path / "m").exists(), "nothing is written for bad input"


def test_mitigate_step_flags_reach_their_stage() -> None:
    """`bna mitigate --steps` sets the BNA steps and `--detect-steps` the detection's; `bna detect --steps`
    the detection's."""
    from bna_gateway.mitigation.cli import build_parser
    from bna_gateway.mitigation.cli.commands import bna_config, detection_config
    from bna_gateway.mitigation.detection import ReverseConfig

    default_pair_steps = ReverseConfig().steps
    args = build_parser().parse_args(["mitigate", "--steps", "5", "--detect-steps", "7", "--out", "b", "--quiet"])
    assert bna_config(args).steps == 5
    assert detection_config(args).pair.steps == 7
    args = build_parser().parse_args(["mitigate", "--steps", "5", "--out", "b", "--quiet"])
    assert detection_config(args).pair.steps == default_pair_steps
    args = build_parser().parse_args(["detect", "--steps", "9", "--out", "d", "--quiet"])
    assert detection_config(args).pair.steps == 9


def test_mitigate_bna_lr_flag_reaches_the_config(capsys: pytest.CaptureFixture) -> None:
    """`bna mitigate --bna-lr` / `--bna-warmup` set the BNA learning rate and warm-up; without them the
    defaults stand; a rate <= 0 or a negative warm-up is a usage error."""
    from bna_gateway.mitigation.bna import BNAConfig
    from bna_gateway.mitigation.cli import build_parser
    from bna_gateway.mitigation.cli.commands import bna_config

    args = build_parser().parse_args(["mitigate", "--bna-lr", "0.03", "--out", "b", "--quiet"])
    assert bna_config(args).lr == pytest.approx(0.03)
    args = build_parser().parse_args(["mitigate", "--out", "b", "--quiet"])
    assert bna_config(args).lr == BNAConfig().lr and bna_config(args).warmup == BNAConfig().warmup
    args = build_parser().parse_args(["mitigate", "--bna-warmup", "0", "--out", "b", "--quiet"])
    assert bna_config(args).warmup == 0
    args = build_parser().parse_args(["mitigate", "--refine-images", "512", "--out", "b", "--quiet"])
    assert bna_config(args).refine_fit_images == 512 and BNAConfig().refine_fit_images == 256
    for flag, bad in (("--bna-lr", "0"), ("--bna-lr", "-0.1"), ("--bna-lr", "fast"), ("--bna-warmup", "-1"),
                      ("--bna-warmup", "2.5"), ("--refine-images", "0")):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(["mitigate", flag, bad, "--out", "b", "--quiet"])
        assert exc.value.code == 2
        assert flag in capsys.readouterr().err
