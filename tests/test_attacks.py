"""The attack lab's triggers: shape, range, determinism, and that each changes only what it should."""
from __future__ import annotations

import pytest
import torch

from bna_gateway.mitigation.lab.attacks import ATTACKS, AttackSpec, build_trigger, parse_params

SHAPE_1 = (1, 16, 16)
SHAPE_3 = (3, 16, 16)
TRIGGERS = [k for k in ATTACKS if k != "none"]
RANDOM_KINDS = ("badnet", "single_pixel", "blend", "wanet")  # trigger depends on the seed


def images(n: int = 6, shape: tuple[int, int, int] = SHAPE_1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=g)


def apply(kind: str, x: torch.Tensor, seed: int = 0, **params) -> torch.Tensor:  # noqa: ANN003
    spec = AttackSpec(kind=kind, params=params, seed=seed)
    return build_trigger(spec, tuple(x.shape[1:]))(x)


def test_every_kind_is_listed() -> None:
    assert set(ATTACKS) == {"none", "badnet", "chessboard", "single_pixel", "blend", "sig", "wanet"}


@pytest.mark.parametrize("shape", [SHAPE_1, SHAPE_3], ids=["gray", "rgb"])
@pytest.mark.parametrize("kind", TRIGGERS)
def test_shape_range_and_change(kind: str, shape: tuple[int, int, int]) -> None:
    x = images(shape=shape)
    out = apply(kind, x)
    assert out.shape == x.shape
    assert out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out, x), f"{kind} left the images unchanged"


def test_none_is_identity() -> None:
    x = images(shape=SHAPE_3)
    assert torch.equal(apply("none", x), x)


@pytest.mark.parametrize("kind", TRIGGERS)
def test_same_spec_same_output(kind: str) -> None:
    x = images(shape=SHAPE_3)
    a = apply(kind, x, seed=3)
    b = apply(kind, x.clone(), seed=3)
    assert torch.equal(a, b)


@pytest.mark.parametrize("kind", RANDOM_KINDS)
def test_seed_changes_random_triggers(kind: str) -> None:
    x = images(shape=SHAPE_3)
    outs = [apply(kind, x, seed=s) for s in (0, 1, 2)]
    assert not torch.equal(outs[0], outs[1]) or not torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("kind", ["chessboard", "sig"])
def test_fixed_triggers_ignore_seed(kind: str) -> None:
    x = images()
    assert torch.equal(apply(kind, x, seed=0), apply(kind, x, seed=5))


@pytest.mark.parametrize("kind", TRIGGERS)
def test_batch_independence(kind: str) -> None:
    x = images(n=5, shape=SHAPE_3)
    trig = build_trigger(AttackSpec(kind=kind, seed=1), SHAPE_3)
    whole = trig(x)
    for i in range(len(x)):
        torch.testing.assert_close(whole[i], trig(x[i : i + 1])[0], rtol=0, atol=1e-6)


# ------------------------------------------------------------------- what each trigger touches
@pytest.mark.parametrize("k", [2, 3, 5])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_badnet_changes_exactly_a_k_by_k_patch(k: int, seed: int) -> None:
    x = torch.full((2, 3, 16, 16), 0.5)  # the binary pattern (0 or 1) differs from 0.5 everywhere
    out = apply("badnet", x, seed=seed, patch_size=k)
    changed = (out != x).any(dim=1)  # [N, H, W]
    assert torch.equal(changed[0], changed[1]), "the patch sits at the same place in every image"
    rows = changed[0].any(dim=1).nonzero().flatten()
    cols = changed[0].any(dim=0).nonzero().flatten()
    assert int(changed[0].sum()) == k * k
    assert len(rows) == k and len(cols) == k
    assert int(rows[-1] - rows[0]) == k - 1 and int(cols[-1] - cols[0]) == k - 1
    patch = out[:, :, rows[0] : rows[0] + k, cols[0] : cols[0] + k]
    assert set(patch.unique().tolist()) <= {0.0, 1.0}
    # the patch replaces the pixels whatever they were
    other = apply("badnet", images(n=2, shape=SHAPE_3), seed=seed, patch_size=k)
    torch.testing.assert_close(other[:, :, rows[0] : rows[0] + k, cols[0] : cols[0] + k], patch)


def test_badnet_fixed_location() -> None:
    x = torch.full((1, 1, 16, 16), 0.5)
    out = apply("badnet", x, patch_size=3, location=[2, 5])
    changed = (out != x)[0, 0].nonzero()
    assert changed[:, 0].min() == 2 and changed[:, 0].max() == 4
    assert changed[:, 1].min() == 5 and changed[:, 1].max() == 7
    with pytest.raises(ValueError, match="does not fit"):
        apply("badnet", x, patch_size=3, location=[14, 0])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_single_pixel_changes_one_location_in_all_channels(seed: int) -> None:
    x = torch.full((3, 3, 16, 16), 0.5)
    out = apply("single_pixel", x, seed=seed)
    diff = out - x
    changed = (diff != 0).any(dim=1)
    assert torch.equal(changed[0], changed[1]) and torch.equal(changed[0], changed[2])
    assert int(changed[0].sum()) == 1
    r, c = changed[0].nonzero()[0].tolist()
    torch.testing.assert_close(diff[:, :, r, c], torch.full((3, 3), 75 / 255))


def test_chessboard_bounded_by_amplitude() -> None:
    amp = 6 / 255
    x = images(shape=SHAPE_3)
    out = apply("chessboard", x)
    assert float((out - x).abs().max()) <= amp + 1e-6
    mid = apply("chessboard", torch.full((1, 1, 8, 8), 0.5))[0, 0] - 0.5
    torch.testing.assert_close(mid.abs(), torch.full((8, 8), amp))
    # neighbours move in opposite directions: a chessboard
    assert torch.all(mid[:, 1:] * mid[:, :-1] < 0) and torch.all(mid[1:, :] * mid[:-1, :] < 0)


def test_blend_is_a_convex_mix_with_a_fixed_pattern() -> None:
    alpha = 0.3
    zeros = torch.zeros(1, *SHAPE_3)
    pattern_part = apply("blend", zeros, alpha=alpha)[0]  # = alpha * P
    pattern = pattern_part / alpha
    assert float(pattern.min()) >= 0 and float(pattern.max()) <= 1 + 1e-6
    assert float(pattern.std()) > 0.1, "the default pattern is random noise"
    x = images(shape=SHAPE_3)
    torch.testing.assert_close(apply("blend", x, alpha=alpha), (1 - alpha) * x + alpha * pattern)


def test_blend_with_an_image_pattern(tmp_path) -> None:  # noqa: ANN001
    from PIL import Image

    arr = (torch.linspace(0, 1, 16).repeat(16, 1) * 255).round().byte().numpy()
    path = tmp_path / "pattern.png"
    Image.fromarray(arr, mode="L").save(path)
    out = apply("blend", torch.zeros(1, 1, 16, 16), alpha=0.5, pattern=str(path))[0, 0]
    torch.testing.assert_close(out, 0.5 * torch.from_numpy(arr).float() / 255, atol=1e-6, rtol=0)


def test_sig_is_a_horizontal_sinusoid() -> None:
    x = torch.full((2, 3, 16, 32), 0.5)
    delta = apply("sig", x) - x
    # constant down every column, the same in every channel and image
    assert torch.allclose(delta, delta[:1, :1, :1, :].expand_as(delta), atol=1e-6)
    wave = delta[0, 0, 0]
    assert float(wave.abs().max()) <= 40 / 255 + 1e-6
    assert float(wave.abs().max()) > 30 / 255
    assert len(set((wave > 1e-6).int().tolist())) == 2, "it varies with the column"


def test_wanet_is_a_small_warp() -> None:
    x = images(n=8, shape=SHAPE_3)
    # a smooth image, so that a small warp means a small change
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 16), torch.linspace(0, 1, 16), indexing="ij")
    smooth = (0.25 + 0.5 * (xx + yy) / 2).expand(1, 3, 16, 16).clone()
    out = apply("wanet", smooth)
    diff = (out - smooth).abs()
    assert 0 < float(diff.mean()) < 0.05
    assert abs(float(out.mean()) - float(smooth.mean())) < 0.02
    out_noise = apply("wanet", x)
    assert abs(float(out_noise.mean()) - float(x.mean())) < 0.05
    # a constant image is left (almost) as it is: a warp moves pixels, it adds nothing
    const = torch.full((1, 1, 16, 16), 0.4)
    torch.testing.assert_close(apply("wanet", const), const, atol=1e-5, rtol=0)


# ------------------------------------------------------------------- the spec
def test_attack_spec_round_trips(tmp_path) -> None:  # noqa: ANN001
    spec = AttackSpec(kind="blend", params={"alpha": 0.25}, mode="a2a", target=3, seed=4, poison_rate=0.05)
    path = tmp_path / "attack.json"
    spec.save(path)
    loaded = AttackSpec.load(path)
    assert (loaded.kind, loaded.mode, loaded.target, loaded.seed, loaded.poison_rate) == ("blend", "a2a", 3, 4, 0.05)
    assert loaded.resolved_params() == spec.resolved_params()
    assert loaded.params["alpha"] == 0.25 and loaded.params["pattern"] == "random"
    x = images(shape=SHAPE_3)
    assert torch.equal(build_trigger(loaded, SHAPE_3)(x), build_trigger(spec, SHAPE_3)(x))


def test_attack_spec_load_missing_file(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(FileNotFoundError, match="attack spec not found"):
        AttackSpec.load(tmp_path / "nope.json")


def test_kind_spelling_is_normalised() -> None:
    assert AttackSpec(kind="Single-Pixel").kind == "single_pixel"


def test_a2a_targets_and_victims() -> None:
    spec = AttackSpec(kind="badnet", mode="a2a", target=2)
    y = torch.arange(5).repeat(2)
    assert torch.equal(spec.target_of(y, 5), (y + 1) % 5)
    assert bool(spec.victims(y).all())


def test_a2o_targets_and_victims() -> None:
    spec = AttackSpec(kind="badnet", mode="a2o", target=2)
    y = torch.arange(5).repeat(2)
    assert torch.equal(spec.target_of(y, 5), torch.full_like(y, 2))
    assert torch.equal(spec.victims(y), y != 2)


def test_unknown_kind_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown attack 'trojan'.*badnet"):
        AttackSpec(kind="trojan")


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError):
        AttackSpec(kind="badnet", mode="a2b")


def test_unknown_param_is_refused_with_the_known_ones() -> None:
    spec = AttackSpec(kind="badnet", params={"patchsize": 3})
    with pytest.raises(ValueError, match=r"no parameter\(s\) \['patchsize'\].*patch_size"):
        spec.resolved_params()
    with pytest.raises(ValueError, match="patchsize"):
        build_trigger(spec, SHAPE_1)


def test_parse_params() -> None:
    parsed = parse_params(["alpha=0.2", "patch_size=3", "location=3,4", "pattern=/tmp/p.png", "location2=[1, 2]",
                           "name=random"])
    assert parsed == {"alpha": 0.2, "patch_size": 3, "location": [3, 4], "pattern": "/tmp/p.png",
                      "location2": [1, 2], "name": "random"}
    assert isinstance(parsed["patch_size"], int) and isinstance(parsed["alpha"], float)
    assert parse_params([]) == {}


def test_parse_params_rejects_a_missing_equals_sign() -> None:
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_params(["alpha0.2"])


def test_parsed_params_drive_the_trigger() -> None:
    x = torch.full((1, 1, 16, 16), 0.5)
    out = apply("badnet", x, **parse_params(["patch_size=4", "location=0,0"]))
    changed = (out != x)[0, 0]
    assert changed[:4, :4].all() and int(changed.sum()) == 16
