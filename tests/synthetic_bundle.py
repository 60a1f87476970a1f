"""A small, deterministic bundle with a twin that really flags and corrects (for gateway tests and the
serving benchmark), built in about a second on CPU.

The model is a randomly initialised width-16 ResNet-18 (1x28x28 input, 10 classes) whose last layer is
set so that f separates "clean" images (a smooth random pattern) from "triggered" ones (the same
pattern with a white 5x5 patch in the corner): along the direction in feature space that the patch
moves images, f answers ``TARGET`` on the patched side and ``SOURCE`` on the other. The twin for
``TARGET`` carries perturbed BatchNorm statistics, chosen by a seeded search so that it moves the
kept triggered images back to ``SOURCE``. Only image pairs on which the outcome is exactly that (clean
-> ``SOURCE``, not checked; triggered -> f says ``TARGET``, twin flags and corrects to ``SOURCE``) are
kept, computed on the 8-bit PNG pixels the gateway will decode, so the expected answers are exact.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from bna_gateway.models.bundle import DetectionSummary, TwinEntry, write_bundle
from bna_gateway.models.network import bn_layers, build_classifier
from bna_gateway.models.spec import InputSpec, ModelSpec
from bna_gateway.models.twins import TwinRouter, TwinStats

TARGET = 9
SOURCE = 2
CLASS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPEC = ModelSpec(
    arch="resnet18",
    arch_kwargs={"width": 16, "in_channels": 1},
    input=InputSpec(shape=(1, 28, 28), mean=(0.5,), std=(0.5,)),
    class_names=CLASS_NAMES,
)


@dataclass(frozen=True)
class SyntheticBundle:
    path: Path
    clean: list[bytes]  # PNGs that f assigns to SOURCE (twin not consulted)
    triggered: list[bytes]  # PNGs that f assigns to TARGET and the twin corrects to SOURCE
    target: int = TARGET
    source: int = SOURCE

    def write_samples(self, out: Path) -> Path:
        """``out/clean/*.png`` and ``out/triggered/*.png``, the layout ``bna demo`` writes."""
        for kind, images in (("clean", self.clean), ("triggered", self.triggered)):
            folder = Path(out) / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i, data in enumerate(images):
                (folder / f"{kind}_{i:03d}.png").write_bytes(data)
        return Path(out)


def png_bytes(pixels: torch.Tensor) -> bytes:
    """``uint8 [H, W]`` -> PNG bytes."""
    buf = io.BytesIO()
    Image.fromarray(pixels.numpy(), mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _candidate_images(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    low = torch.rand(n, 1, 7, 7, generator=generator)
    clean = F.interpolate(low, size=(28, 28), mode="bilinear", align_corners=False)
    clean = (clean * 200).round().to(torch.uint8)  # leave headroom so the white patch stands out
    triggered = clean.clone()
    triggered[:, :, -6:-1, -6:-1] = 255
    return clean, triggered


def _features(classifier: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    captured: list[torch.Tensor] = []
    hook = classifier.net.linear.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
    try:
        classifier(x)
    finally:
        hook.remove()
    return captured[0]


def _separate(linear: torch.nn.Linear, positive: torch.Tensor, negative: torch.Tensor) -> None:
    """Set the last layer so that ``positive`` features score ``TARGET`` and ``negative`` ones ``SOURCE``
    (least-squares linear discriminant, scaled for confident softmax outputs)."""
    feats = torch.cat([positive, negative]).double()
    design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)
    y = torch.cat([torch.ones(len(positive)), -torch.ones(len(negative))]).double()
    ridge = 1e-6 * torch.eye(design.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(design.T @ design + ridge, design.T @ y)
    scale = 6.0 / float((design @ w).abs().median())
    w = (scale * w).float()
    linear.weight.zero_()
    linear.bias.zero_()
    linear.weight[TARGET] = w[:-1]
    linear.weight[SOURCE] = -w[:-1]
    linear.bias[TARGET] = w[-1]
    linear.bias[SOURCE] = -w[-1]


def _perturbed_twin(classifier: torch.nn.Module, trial: int) -> TwinStats:
    g = torch.Generator().manual_seed(1000 + trial)
    mean, var = {}, {}
    for name, bn in bn_layers(classifier.net).items():
        mean[name] = bn.running_mean + 0.2 * torch.randn(bn.running_mean.shape, generator=g)
        var[name] = bn.running_var * torch.exp(0.2 * torch.randn(bn.running_var.shape, generator=g))
    return TwinStats(TARGET, mean, var, flag_threshold=0.0, sources=[SOURCE])


@torch.no_grad()
def build_synthetic_bundle(out_dir: Path, n_samples: int = 8, seed: int = 0) -> SyntheticBundle:
    """Write the bundle to ``out_dir``; return it with ``n_samples`` clean and triggered PNGs."""
    torch.manual_seed(seed)
    classifier = build_classifier(SPEC).eval()
    generator = torch.Generator().manual_seed(seed)
    clean_u8, trig_u8 = _candidate_images(max(64, 8 * n_samples), generator)
    clean, trig = clean_u8.float() / 255, trig_u8.float() / 255

    phi_clean, phi_trig = _features(classifier, clean), _features(classifier, trig)
    for trial in range(16):
        twin = _perturbed_twin(classifier, trial)
        router = TwinRouter(classifier, [twin])
        captured: list[torch.Tensor] = []
        hook = classifier.net.linear.register_forward_hook(lambda m, inp, out: captured.append(inp[0]))
        try:
            router.twin_logits(trig, TARGET)
        finally:
            hook.remove()
        _separate(classifier.net.linear, phi_trig, torch.cat([phi_clean, captured[0]]))
        on_clean, on_trig = router(clean), router(trig)
        f_confidence = classifier(trig).softmax(dim=1).max(dim=1).values
        keep = (  # exact outcomes, with margins far above batch-to-batch float noise
            (on_clean.confidence > 0.75)
            & (on_trig.confidence > 0.75)
            & (f_confidence > 0.75)
            & (on_clean.original_label == SOURCE)
            & ~on_clean.checked_by_twin
            & (on_trig.original_label == TARGET)
            & on_trig.trigger_detected
            & (on_trig.label == SOURCE)
        )
        if int(keep.sum()) >= n_samples:
            break
    else:
        raise RuntimeError("no twin in the search flips enough triggered images; change the seed")

    idx = keep.nonzero().flatten()[:n_samples]
    detection = DetectionSummary(
        detected_targets=[TARGET], sources={str(TARGET): [SOURCE]}, scores={str(TARGET): 9.5}, trigger_type="patch"
    )
    entry = TwinEntry(target=TARGET, file="", sources=[SOURCE], score=9.5)
    write_bundle(Path(out_dir), SPEC, classifier.net, [twin], detection, [entry], {"synthetic": True, "seed": seed})
    return SyntheticBundle(
        path=Path(out_dir),
        clean=[png_bytes(clean_u8[i, 0]) for i in idx],
        triggered=[png_bytes(trig_u8[i, 0]) for i in idx],
    )


def bundle_fixture(n_samples: int):  # type: ignore[no-untyped-def]
    """A module-scoped pytest fixture named by its assignment (``bundle = bundle_fixture(4)``) that builds
    the synthetic bundle once per test module."""
    import pytest

    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory: pytest.TempPathFactory) -> SyntheticBundle:
        torch.set_num_threads(1)
        return build_synthetic_bundle(tmp_path_factory.mktemp("bundle"), n_samples=n_samples)

    return fixture
