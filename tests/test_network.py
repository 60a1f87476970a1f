"""The deployable network's layout: channels-last where the module accepts it, the default otherwise."""
from __future__ import annotations

import copy

import torch
from torch import nn

from bna_gateway.models.network import Classifier, build_classifier, save_weights, load_weights, to_channels_last
from bna_gateway.models.spec import InputSpec, ModelSpec

INPUT = InputSpec(shape=(1, 12, 12), mean=(0.5,), std=(0.25,))


class ViewAfterConv(nn.Module):
    """An owner's network written for contiguous NCHW activations: ``.view`` after a convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.BatchNorm2d(4)
        self.head = nn.Linear(4 * 12 * 12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.norm(self.conv(x)))
        return self.head(out.view(out.size(0), -1))


def _is_channels_last(module: nn.Module) -> bool:
    weight = [p for p in module.parameters() if p.dim() == 4][-1]  # the stem's 1-channel weight is both
    return weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_registry_model_gets_channels_last_with_the_same_outputs() -> None:
    spec = ModelSpec(arch="resnet18", arch_kwargs={"num_classes": 3, "in_channels": 1, "width": 4}, input=INPUT,
                     class_names=["a", "b", "c"])
    torch.manual_seed(0)
    clf = build_classifier(spec).eval()
    assert _is_channels_last(clf)
    plain = copy.deepcopy(clf).to(memory_format=torch.contiguous_format)
    assert not _is_channels_last(plain)
    x = torch.rand(5, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(clf(x), plain(x), rtol=1e-4, atol=1e-5)


def test_module_that_views_activations_keeps_the_default_layout() -> None:
    torch.manual_seed(0)
    clf = Classifier(ViewAfterConv(), INPUT).train()
    # the module really does fail in channels-last: otherwise this test proves nothing
    probe = copy.deepcopy(clf).to(memory_format=torch.channels_last)
    try:
        probe(torch.zeros(2, 1, 12, 12))
        raise AssertionError("expected the .view to fail on channels-last activations")
    except RuntimeError:
        pass
    before = clf.net.norm.running_mean.clone()
    out = to_channels_last(clf, INPUT)
    assert out is clf and not _is_channels_last(clf)
    assert clf.training, "the probe must leave the module's mode as it found it"
    torch.testing.assert_close(clf.net.norm.running_mean, before)  # the probe runs in eval mode
    assert clf(torch.rand(2, 1, 12, 12)).shape == (2, 3)


def test_weights_saved_from_channels_last_load_into_either_layout(tmp_path) -> None:  # noqa: ANN001
    spec = ModelSpec(arch="resnet18", arch_kwargs={"num_classes": 3, "in_channels": 1, "width": 4}, input=INPUT,
                     class_names=["a", "b", "c"])
    torch.manual_seed(1)
    src = build_classifier(spec).eval()
    save_weights(src.net, tmp_path / "w.safetensors")
    dst = build_classifier(spec).eval()
    load_weights(dst.net, tmp_path / "w.safetensors")
    assert _is_channels_last(dst)
    plain = copy.deepcopy(dst).to(memory_format=torch.contiguous_format)
    load_weights(plain.net, tmp_path / "w.safetensors")
    x = torch.rand(4, 1, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
        torch.testing.assert_close(plain(x), src(x), rtol=1e-4, atol=1e-5)
