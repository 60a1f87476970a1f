"""NC: Neural Cleanse's unlearning (Wang et al., IEEE S&P 2019), given *our* detection's trigger estimates.

Neural Cleanse reverse-engineers a trigger per label, flags outlier labels, and patches the model by
fine-tuning on clean images of which a share carry the reverse-engineered trigger with their *true*
label. Its detection step is replaced here by this project's detection (``bna mitigate`` wrote it
beside the bundle): the same flagged targets and trigger estimates BNA's twins are fitted on
(``TargetTrigger.module()``, one per detected target), so the comparison is of the repair alone.

Unlearning set, as BackdoorBench's ``nc`` builds it (SCLBD/BackdoorBench ``defense/nc.py`` with
``config/defense/nc/config.yaml``: ``unlearning_ratio 0.2``): a seeded 80 % of the clean images as they
are, plus, for every flagged target, the other 20 % stamped with that target's trigger, labels unchanged.
Then fine-tuning with BackdoorBench's defaults (SGD, cosine, 100 epochs) scaled as
``common.FinetuneConfig`` says (lr 0.1 for models trained at 0.1). No flagged target: the model is
returned unchanged (as BackdoorBench does when NC finds no backdoor). Seeded by ``FinetuneConfig.seed``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from peers.common import FinetuneConfig, Repaired, clone, finetune, tuning_info


@dataclass(frozen=True)
class UnlearnConfig:
    unlearning_ratio: float = 0.2


@torch.no_grad()
def unlearning_set(x: torch.Tensor, y: torch.Tensor, triggers: Sequence[nn.Module], ratio: float,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean images (1 - ratio of them) plus the rest stamped with each trigger, all with their true labels."""
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_clean = int(len(y) * (1 - ratio))
    keep, stamp = perm[:n_clean], perm[n_clean:]
    xs = [x[keep]] + [trigger(x[stamp]).clamp(0, 1) for trigger in triggers]
    ys = [y[keep]] + [y[stamp]] * len(triggers)
    return torch.cat(xs), torch.cat(ys)


def defend(model: nn.Module, clean_x: torch.Tensor, clean_y: torch.Tensor, triggers: Sequence[nn.Module],
           cfg: FinetuneConfig = FinetuneConfig(), ucfg: UnlearnConfig = UnlearnConfig()) -> Repaired:
    """A copy of ``model`` unlearned on ``triggers`` (one estimated trigger per flagged target)."""
    if not triggers:
        return Repaired(clone(model).eval(), {"unlearned": False, "triggers": 0})
    stamps = [t.to(clean_x.device) for t in triggers]
    x, y = unlearning_set(clean_x, clean_y, stamps, ucfg.unlearning_ratio, cfg.seed)
    out = finetune(clone(model), x, y, cfg, desc="nc")
    return Repaired(out, {"unlearned": True, "triggers": len(triggers), "images": len(y), **tuning_info(cfg, len(y))})
