"""``bna evaluate``: a bundle against an attack, on the model's held-out split or a folder of test images."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bna_gateway.mitigation.evaluation import Evaluation, evaluate_bundle
from bna_gateway.mitigation.imagefolder import ImageSet, read_image_folder
from bna_gateway.mitigation.jobs.options import RunOptions
from bna_gateway.mitigation.lab.attacks import AttackSpec
from bna_gateway.mitigation.lab.datasets import load_ref
from bna_gateway.models.bundle import LoadedBundle, load_bundle


@dataclass(frozen=True)
class EvaluateOptions:
    bundle: Path
    attack_file: Path
    test_dir: Path | None = None  # class sub-folders; default: the held-out split of the model's dataset
    run: RunOptions = RunOptions()


def held_out_images(bundle: LoadedBundle, test_dir: Path | None) -> ImageSet:
    spec = bundle.manifest.model
    if test_dir is not None:
        c, h, w = spec.input.shape
        return read_image_folder(test_dir, channels=c, size=(h, w), class_names=spec.class_names)[0]
    if spec.dataset is None:
        raise ValueError("the bundle's model has no dataset on record: pass --test FOLDER")
    return load_ref(spec.dataset).test


def evaluate(opts: EvaluateOptions) -> Evaluation:
    bundle = load_bundle(Path(opts.bundle), opts.run.torch_device)
    attack = AttackSpec.load(Path(opts.attack_file))
    return evaluate_bundle(bundle, attack, held_out_images(bundle, opts.test_dir))
