"""Implementations of the ``bna`` sub-commands (argument parsing lives in ``cli.py``)."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _seed(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)


def cmd_train(args: argparse.Namespace) -> int:
    from models.network import build_classifier
    from models.spec import DatasetRef, ModelSpec
    from mitigation.attacks import AttackSpec, parse_params
    from mitigation.datasets import load_dataset
    from mitigation.modeldir import save_model_dir
    from mitigation.training import TrainConfig, resolve_device, train_classifier

    _seed(args)
    data = load_dataset(args.dataset, args.data_root, args.clean_per_class, args.seed)
    c = data.input.channels
    kwargs: dict = {"num_classes": data.num_classes, "in_channels": c}
    if args.arch in ("resnet18", "preact_resnet18", "vgg16_bn"):
        kwargs["width"] = args.width or (16 if data.input.shape[1] <= 32 else 64)
    elif args.width:
        kwargs["width_mult"] = args.width / 64
    spec = ModelSpec(arch=args.arch, arch_kwargs=kwargs, input=data.input, class_names=data.class_names,
                     dataset=DatasetRef(name=args.dataset, root=args.data_root, clean_per_class=args.clean_per_class,
                                        seed=args.seed))
    attack = AttackSpec(kind=args.attack, params=parse_params(args.attack_param), mode=args.mode, target=args.target,
                        seed=args.seed, poison_rate=args.poison_rate)
    attack.resolved_params()
    if attack.kind != "none" and attack.mode == "a2o" and not 0 <= attack.target < data.num_classes:
        raise ValueError(f"--target {attack.target} is not a class of {args.dataset} (0..{data.num_classes - 1})")
    natural = args.dataset in ("cifar10", "imagefolder")
    cfg = TrainConfig(epochs=args.epochs or (12 if data.input.shape[1] <= 32 else 30), batch_size=args.batch_size,
                      lr=args.lr, seed=args.seed, augment=natural, flip=natural,
                      device=str(resolve_device(args.device)), progress=not args.quiet)
    model = build_classifier(spec)
    model, metrics, seconds = train_classifier(model, data, attack, cfg)
    out = Path(args.out)
    save_model_dir(out, spec, model.cpu(), attack, {**metrics.as_dict(), "train_seconds": round(seconds, 1)})
    print(json.dumps({"out": str(out), **metrics.as_dict(), "train_seconds": round(seconds, 1)}))
    return 0
