"""Sharding detection on Ray: ``bna detect`` with ``--ray`` on a local 2-CPU Ray (started by these tests
on loopback, stopped by them) writes the same detection.json as without Ray, on one worker or two.

The model is the tiny BadNet-poisoned ResNet of ``tests/tiny_models.py``; detection runs the three
trigger families with short budgets, and small passes, so that every optimisation has several chunks
for the workers to share.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from PIL import Image

import tiny_models as tm
from bna_gateway.mitigation.cli import main
from bna_gateway.mitigation.cli.commands import sharding
from bna_gateway.mitigation.cli.parser import build_parser
from bna_gateway.mitigation.detection import DetectionConfig, ReverseConfig
from bna_gateway.mitigation.detection.reverse import reverse_engineer
from bna_gateway.mitigation.detection.sharding import RayOptimiser, Sharding, torch_threads
from bna_gateway.mitigation.jobs.detect import DetectOptions, detect
from bna_gateway.mitigation.jobs.options import RunOptions
from bna_gateway.mitigation.modeldir import ModelSource, save_model_dir
from bna_gateway.mitigation.triggers import PATCH

ray = pytest.importorskip("ray", reason="the optional dependency ray (pip install -e '.[ray]')")

SHORT = ReverseConfig(steps=12, images_per_group=4, max_images_per_pass=32, progress=False)
# short budgets find the backdoor from one source only; the reach test, which drops such a target, is off so
# that the runs also compare trigger estimates
CONFIG = DetectionConfig(trigger_type="all", pair=SHORT, target=ReverseConfig(steps=12, images_per_group=8,
                         max_images_per_pass=32, progress=False), reestimate_steps=12, reestimate_images=8,
                         min_reach=0.0)
RUN = RunOptions(seed=0, device="cpu", progress=False)
TIMES = ("seconds", "timings")  # wall-clock: the only fields allowed to differ


@pytest.fixture(scope="module")
def local_ray(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A Ray of 2 CPUs in this process, on loopback, with its own session folder; shut down after."""
    ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", _temp_dir=str(tmp_path_factory.mktemp("ray")))
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny poisoned model as a model directory, and its clean set as a folder of PNGs."""
    tiny = tm.backdoored()
    root = tmp_path_factory.mktemp("tiny")
    save_model_dir(root / "model", tm.SPEC, tiny.classifier, tiny.attack, {})
    for i, (x, y) in enumerate(zip(tiny.data.clean.x, tiny.data.clean.y.tolist())):
        folder = root / "clean" / tm.SPEC.class_names[y]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0] * 255).round().byte().numpy(), mode="L").save(folder / f"{i:03d}.png")
    return root / "model", root / "clean"


def run_detect(model_dir: tuple[Path, Path], out: Path, shards: Sharding) -> dict[str, Any]:
    source = ModelSource(model_dir=model_dir[0], clean_dir=model_dir[1])
    path = detect(DetectOptions(source, out, CONFIG, RUN, shards)).path
    doc = json.loads(path.read_text())
    doc["triggers_bytes"] = (out / doc["triggers_file"]).read_bytes() if doc.get("triggers_file") else None
    return {k: v for k, v in doc.items() if k not in TIMES}


def test_two_workers_one_worker_and_no_ray_write_the_same_detection(local_ray: None, model_dir: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    alone = run_detect(model_dir, tmp_path / "alone", Sharding(threads=1))
    assert tm.TARGET in alone["detected_targets"], "short budgets, but the backdoor is among the targets"
    two = run_detect(model_dir, tmp_path / "two", Sharding(ray="auto", workers=2, threads=1))
    one = run_detect(model_dir, tmp_path / "one", Sharding(ray="auto", workers=1, threads=1))
    for name, doc in (("2 workers", two), ("1 worker", one)):
        assert doc.keys() == alone.keys()
        for key in alone:
            assert doc[key] == alone[key], f"{name}: {key} differs from the run without Ray"
    deadline = time.monotonic() + 30
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2, "no actor outlives its detection"


def test_workers_share_the_chunks_and_keep_the_model_for_the_run(local_ray: None) -> None:
    tiny = tm.backdoored()
    x, y = tiny.data.clean.x, tiny.data.clean.y
    groups, targets = [[s] for s in range(tm.NUM_CLASSES) if s != tm.TARGET], [tm.TARGET] * (tm.NUM_CLASSES - 1)
    cfg = ReverseConfig(steps=5, images_per_group=4, max_images_per_pass=8, progress=False)  # 2 groups a chunk
    with torch_threads(1):
        here = reverse_engineer(tiny.classifier, x, y, groups, targets, PATCH, cfg)
        with RayOptimiser("auto", workers=2, threads=1, gpu=False) as opt:
            first = opt(tiny.classifier, x, y, groups, targets, PATCH, cfg)
            second = opt(tiny.classifier, x, y, groups, targets, PATCH, cfg)
            actors = opt.describe()
            assert opt.actors_started == 2, "one pool of actors for every call on the same model and clean set"
    assert [a["threads"] for a in actors] == [1, 1] and all(a["chunks"] >= 1 for a in actors)
    assert sum(a["chunks"] for a in actors) == 6  # 3 chunks a call
    assert torch.equal(first.size, here.size) and torch.equal(first.asr, here.asr)
    for k in here.tensors:
        assert torch.equal(first.tensors[k], here.tensors[k]) and torch.equal(second.tensors[k], here.tensors[k])


def test_actors_run_with_this_processes_thread_count(local_ray: None) -> None:
    """Ray starts a 1-CPU actor with one OpenMP thread; the actors use the driver's count instead."""
    tiny = tm.backdoored()
    x, y = tiny.data.clean.x, tiny.data.clean.y
    cfg = ReverseConfig(steps=3, images_per_group=4, progress=False)
    with torch_threads(2):
        here = reverse_engineer(tiny.classifier, x, y, [[0], [1]], [tm.TARGET, tm.TARGET], PATCH, cfg)
        with RayOptimiser("auto", workers=1, threads=torch.get_num_threads(), gpu=False) as opt:
            there = opt(tiny.classifier, x, y, [[0], [1]], [tm.TARGET, tm.TARGET], PATCH, cfg)
            assert [a["threads"] for a in opt.describe()] == [2]
    assert torch.equal(there.tensors["mask"], here.tensors["mask"])


def test_the_flags_reach_the_job() -> None:
    base = ["detect", "--model", "m", "--out", "o"]
    args = build_parser().parse_args([*base, "--ray", "10.0.0.5:6379", "--ray-workers", "4", "--threads", "1"])
    assert sharding(args) == Sharding(ray="10.0.0.5:6379", workers=4, threads=1)
    assert sharding(build_parser().parse_args(base)) == Sharding()
    args = build_parser().parse_args(["mitigate", "--model", "m", "--out", "o", "--ray", "auto"])
    assert sharding(args) == Sharding(ray="auto")


def test_ray_workers_without_ray_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["detect", "--model", "m", "--out", "o", "--ray-workers", "2"]) == 2
    assert "--ray-workers needs --ray" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers and threads must be 1 or more"):
        Sharding(ray="auto", threads=0)
