"""Datasets: stratified splits, the embedded digits, a user's image folder, CIFAR-10 from disk, and the
messages a user gets when a folder is not what the loader expects."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bna_gateway.mitigation.lab.datasets import (
    CIFAR_CLASSES,
    DatasetError,
    load_cifar10,
    load_dataset,
    load_imagefolder,
    load_mnist5k,
    make_synthetic,
    read_image_folder,
    stratified_split,
)


# ------------------------------------------------------------------- stratified_split
def labels(counts: list[int]) -> torch.Tensor:
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    return y[torch.randperm(len(y), generator=torch.Generator().manual_seed(123))]  # classes interleaved


def test_split_is_stratified_with_exact_counts() -> None:
    y = labels([30, 40, 25])
    tr, cl, te = stratified_split(y, clean_per_class=5, test_per_class=8, seed=0)
    for c, n in enumerate([30, 40, 25]):
        assert int((y[cl] == c).sum()) == 5
        assert int((y[te] == c).sum()) == 8
        assert int((y[tr] == c).sum()) == n - 13


def test_split_fraction_of_each_class() -> None:
    y = labels([40, 20])
    tr, cl, te = stratified_split(y, clean_per_class=2, test_per_class=0.25, seed=0)
    assert [int((y[te] == c).sum()) for c in (0, 1)] == [10, 5]
    assert [int((y[cl] == c).sum()) for c in (0, 1)] == [2, 2]


def test_split_is_disjoint_and_covers_everything() -> None:
    y = labels([30, 40, 25])
    tr, cl, te = stratified_split(y, 5, 8, seed=1)
    all_idx = torch.cat([tr, cl, te])
    assert all_idx.unique().numel() == all_idx.numel(), "an index is in two splits"
    assert sorted(all_idx.tolist()) == list(range(len(y)))


def test_split_is_deterministic_in_seed_and_differs_across_seeds() -> None:
    y = labels([30, 40, 25])
    a = stratified_split(y, 5, 8, seed=7)
    b = stratified_split(y, 5, 8, seed=7)
    c = stratified_split(y, 5, 8, seed=8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[1], c[1]) and not torch.equal(a[2], c[2])


def test_split_refuses_a_class_that_is_too_small() -> None:
    y = labels([30, 6])
    with pytest.raises(DatasetError, match="class 1 has 6 images.*5 clean.*1 test"):
        stratified_split(y, 5, 1, seed=0)


# ------------------------------------------------------------------- embedded data
@pytest.fixture(scope="module")
def mnist():
    return load_mnist5k()


def test_mnist5k_splits(mnist) -> None:  # noqa: ANN001
    assert (len(mnist.train), len(mnist.clean), len(mnist.test)) == (3500, 500, 1000)
    assert mnist.class_names == [str(i) for i in range(10)]
    assert mnist.num_classes == 10
    assert torch.equal(torch.bincount(mnist.clean.y, minlength=10), torch.full((10,), 50))
    assert torch.equal(torch.bincount(mnist.test.y, minlength=10), torch.full((10,), 100))
    for part in (mnist.train, mnist.clean, mnist.test):
        assert part.x.shape[1:] == (1, 28, 28)
        assert part.x.dtype == torch.float32
        assert float(part.x.min()) >= 0.0 and float(part.x.max()) <= 1.0
    assert float(mnist.train.x.max()) > 0.99, "pixel values are scaled to [0, 1], not left in [0, 255/255**2]"
    assert tuple(mnist.input.shape) == (1, 28, 28)


def test_mnist5k_splits_hold_different_images(mnist) -> None:  # noqa: ANN001
    flat = lambda s: {hash(r.numpy().tobytes()) for r in s.x.flatten(1)}  # noqa: E731
    assert not flat(mnist.clean) & flat(mnist.test)


def test_image_set_per_class(mnist) -> None:  # noqa: ANN001
    few = mnist.clean.per_class(3)
    assert len(few) == 30
    assert torch.equal(torch.bincount(few.y, minlength=10), torch.full((10,), 3))
    assert torch.equal(few.x, mnist.clean.per_class(3).x), "deterministic"
    assert not torch.equal(few.x, mnist.clean.per_class(3, seed=1).x)
    assert mnist.clean.per_class(None) is mnist.clean
    assert len(mnist.clean.per_class(1000)) == 500, "at most n: a class with fewer keeps all of them"


def test_synthetic_is_small_and_stratified() -> None:
    d = make_synthetic(num_classes=4, per_class=60, size=16, clean_per_class=10)
    assert d.class_names == ["class0", "class1", "class2", "class3"]
    assert torch.equal(torch.bincount(d.clean.y), torch.full((4,), 10))
    assert torch.equal(torch.bincount(d.test.y), torch.full((4,), 15))
    assert d.train.x.shape[1:] == (1, 16, 16)
    assert torch.equal(make_synthetic().train.x, make_synthetic().train.x)


# ------------------------------------------------------------------- a user's image folder
def save(img: Image.Image, path: Path, **kw) -> None:  # noqa: ANN003
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kw)


def gray_p(value: int, size: tuple[int, int]) -> Image.Image:
    return Image.new("L", size, value).convert("P")


@pytest.fixture
def mixed_folder(tmp_path: Path) -> Path:
    """Three classes, created out of order; images of different sizes, modes and formats."""
    root = tmp_path / "images"
    save(Image.new("L", (12, 10), 40), root / "cat" / "a.png")
    save(Image.new("RGB", (20, 20), (200, 200, 200)), root / "cat" / "b.jpg", quality=95)
    save(Image.new("L", (12, 10), 10), root / "ant" / "a0.png")  # the first image in sorted order: L, W=12, H=10
    save(Image.new("RGBA", (8, 8), (100, 100, 100, 255)), root / "ant" / "b.png")
    save(gray_p(160, (16, 16)), root / "bee" / "p.png")
    save(Image.new("RGB", (30, 14), (255, 255, 255)), root / "bee" / "q.jpeg", quality=95)
    (root / "bee" / "notes.txt").write_text("not an image")
    save(Image.new("L", (5, 5), 0), root / ".hidden" / "x.png")  # not a class
    return root


def test_read_image_folder_mixed_modes_and_sizes(mixed_folder: Path) -> None:
    data, names, shape = read_image_folder(mixed_folder)
    assert names == ["ant", "bee", "cat"]
    assert shape == (1, 10, 12), "channels and size come from the first image"
    assert data.x.shape == (6, 1, 10, 12)
    assert data.y.tolist() == [0, 0, 1, 1, 2, 2]
    assert float(data.x.min()) >= 0 and float(data.x.max()) <= 1
    expected = [10, 100, 160, 255, 40, 200]  # gray level of each solid image, in file order
    means = (data.x.mean(dim=(1, 2, 3)) * 255).tolist()
    assert means == pytest.approx(expected, abs=2.5)


def test_read_image_folder_with_given_channels_size_and_classes(mixed_folder: Path) -> None:
    data, names, shape = read_image_folder(mixed_folder, channels=3, size=(8, 9), class_names=["cat", "ant"])
    assert names == ["cat", "ant"]
    assert shape == (3, 8, 9)
    assert data.x.shape == (4, 3, 8, 9)
    assert data.y.tolist() == [0, 0, 1, 1]
    # gray images expanded to three equal channels
    torch.testing.assert_close(data.x[:, 0], data.x[:, 1])
    torch.testing.assert_close(data.x[:, 1], data.x[:, 2])


def test_read_image_folder_rgb_first(tmp_path: Path) -> None:
    root = tmp_path / "rgb"
    save(Image.new("RGB", (7, 5), (255, 0, 0)), root / "a" / "1.png")
    save(Image.new("L", (9, 9), 128), root / "a" / "2.png")
    save(gray_p(30, (4, 4)), root / "b" / "1.png")
    save(Image.new("RGBA", (5, 7), (0, 0, 255, 128)), root / "b" / "2.png")
    data, names, shape = read_image_folder(root)
    assert shape == (3, 5, 7)
    assert names == ["a", "b"]
    red = data.x[0]
    assert torch.allclose(red[0], torch.ones(5, 7)) and torch.allclose(red[1:], torch.zeros(2, 5, 7))
    assert torch.allclose(data.x[3, 2], torch.ones(5, 7)), "RGBA keeps its colour channels"


def test_load_imagefolder_splits_and_normalisation(tmp_path: Path) -> None:
    root = tmp_path / "folder"
    g = np.random.default_rng(0)
    for c in ("x", "y"):
        for i in range(10):
            save(Image.fromarray(g.integers(0, 256, (6, 6, 3), dtype=np.uint8), "RGB"), root / c / f"{i}.png")
    d = load_imagefolder(root, clean_per_class=3)
    assert d.class_names == ["x", "y"]
    assert (len(d.train), len(d.clean), len(d.test)) == (10, 6, 4)
    assert tuple(d.input.shape) == (3, 6, 6)
    assert len(d.input.mean) == 3 and all(0.3 < m < 0.7 for m in d.input.mean)
    assert all(0.2 < s < 0.4 for s in d.input.std)


# ------------------------------------------------------------------- refusing bad folders
def test_missing_folder(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=r"does not exist.*sub-folder per class") as err:
        read_image_folder(missing)
    assert str(missing) in str(err.value)


def test_folder_without_class_subfolders(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    save(Image.new("L", (4, 4)), root / "a.png")
    save(Image.new("L", (4, 4)), root / "b.png")
    with pytest.raises(DatasetError, match=r"expected one sub-folder per class.*found 0") as err:
        read_image_folder(root)
    assert str(root) in str(err.value)


def test_class_folder_without_images(tmp_path: Path) -> None:
    root = tmp_path / "f"
    save(Image.new("L", (4, 4)), root / "full" / "a.png")
    (root / "empty").mkdir()
    (root / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DatasetError, match=r"class folder 'empty' holds no images.*\.png") as err:
        read_image_folder(root)
    assert str(root) in str(err.value)


def test_class_names_without_folders(tmp_path: Path) -> None:
    root = tmp_path / "f"
    save(Image.new("L", (4, 4)), root / "a" / "1.png")
    save(Image.new("L", (4, 4)), root / "b" / "1.png")
    with pytest.raises(DatasetError, match=r"no sub-folder for classes \['c'\]"):
        read_image_folder(root, class_names=["a", "c"])


@pytest.mark.parametrize("first", [True, False], ids=["corrupt-first", "corrupt-later"])
def test_corrupt_image(tmp_path: Path, first: bool) -> None:
    root = tmp_path / "f"
    save(Image.new("L", (4, 4)), root / "a" / "good.png")
    save(Image.new("L", (4, 4)), root / "b" / "good.png")
    bad = root / ("a" if first else "b") / ("0_bad.png" if first else "z_bad.png")
    bad.write_bytes(b"this is not a PNG at all" * 10)
    with pytest.raises(DatasetError, match="cannot read") as err:
        read_image_folder(root)
    assert str(bad) in str(err.value)


def test_truncated_image(tmp_path: Path) -> None:
    root = tmp_path / "f"
    save(Image.new("L", (4, 4)), root / "a" / "good.png")
    save(Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)), root / "b" / "t.png")
    data = (root / "b" / "t.png").read_bytes()
    (root / "b" / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cannot read .*t\.png"):
        read_image_folder(root)


def test_cifar10_root_without_the_release(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"cifar-10-batches-py.*data_batch_1\.\.5.*test_batch") as err:
        load_cifar10(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "downloaded" in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "imagefolder"])
def test_local_datasets_need_a_data_root(name: str) -> None:
    with pytest.raises(DatasetError, match=rf"{name}.*--data-root"):
        load_dataset(name)


def test_unknown_dataset_lists_the_choices() -> None:
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet'.*mnist5k.*synthetic.*cifar10"):
        load_dataset("imagenet")


def test_dataset_error_is_a_value_error() -> None:
    assert issubclass(DatasetError, ValueError)  # the CLI turns ValueErrors into one-line messages


# ------------------------------------------------------------------- CIFAR-10 from a local release
TRAIN_PER_CLASS = 3  # per class in every data batch
TEST_PER_CLASS = 6  # per class in the test batch


def _fake_cifar_arrays(seed: int) -> list[tuple[np.ndarray, list[int]]]:
    """Six batches (five data batches, then the test batch): uint8 [n, 3072] and labels."""
    g = np.random.default_rng(seed)
    out = []
    for i in range(6):
        per = TEST_PER_CLASS if i == 5 else TRAIN_PER_CLASS
        y = np.tile(np.arange(10), per)
        g.shuffle(y)
        x = g.integers(0, 256, (len(y), 3072), dtype=np.uint8)
        x[:, 0] = y * 20 + i  # a recognisable first pixel: class and batch
        out.append((x, [int(v) for v in y]))
    return out


def write_cifar_python(root: Path, batches, protocol: int = 2) -> Path:  # noqa: ANN001
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name, (x, y) in zip(names, batches):
        doc = {b"batch_label": name.encode(), b"labels": y, b"data": x,
               b"filenames": [f"{name}_{j}.png".encode() for j in range(len(y))]}
        (folder / name).write_bytes(pickle.dumps(doc, protocol=protocol))
    return folder


def write_cifar_binary(root: Path, batches) -> Path:  # noqa: ANN001
    folder = root / "cifar-10-batches-bin"
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name, (x, y) in zip(names, batches):
        rec = np.concatenate([np.asarray(y, dtype=np.uint8)[:, None], x], axis=1)
        assert rec.shape[1] == 3073
        (folder / name).write_bytes(rec.tobytes())
    return folder


@pytest.fixture(scope="module")
def fake_batches():
    return _fake_cifar_arrays(0)


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar10_python_release(tmp_path: Path, fake_batches, protocol: int) -> None:  # noqa: ANN001
    write_cifar_python(tmp_path, fake_batches, protocol)
    d = load_cifar10(tmp_path, clean_per_class=2)
    assert d.class_names == CIFAR_CLASSES
    assert tuple(d.input.shape) == (3, 32, 32)
    assert len(d.train) == 5 * 10 * TRAIN_PER_CLASS
    assert torch.equal(torch.bincount(d.clean.y, minlength=10), torch.full((10,), 2))
    assert torch.equal(torch.bincount(d.test.y, minlength=10), torch.full((10,), TEST_PER_CLASS - 2))
    for part in (d.train, d.clean, d.test):
        assert part.x.shape[1:] == (3, 32, 32)
        assert float(part.x.min()) >= 0 and float(part.x.max()) <= 1
        # pixel 0 of the red plane encodes class and batch: labels stay with their images
        first = (part.x[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(first // 20, part.y)
    batch_of = lambda s: set(((s.x[:, 0, 0, 0] * 255).round().long() % 20).tolist())  # noqa: E731
    assert batch_of(d.train) == {0, 1, 2, 3, 4}
    assert batch_of(d.clean) == {5} and batch_of(d.test) == {5}, "clean pool and held-out split: the test batch"
    # the layout is R, G, B planes of 32 x 32, row major
    x0, _ = fake_batches[0]
    torch.testing.assert_close(d.train.x[0], torch.from_numpy(x0[0].reshape(3, 32, 32)).float() / 255)


def test_cifar10_binary_release_loads_like_the_python_one(tmp_path: Path, fake_batches) -> None:  # noqa: ANN001
    write_cifar_python(tmp_path / "py", fake_batches)
    write_cifar_binary(tmp_path / "bin", fake_batches)
    a = load_cifar10(tmp_path / "py", clean_per_class=2, seed=3)
    b = load_cifar10(tmp_path / "bin", clean_per_class=2, seed=3)
    for part in ("train", "clean", "test"):
        assert torch.equal(getattr(a, part).x, getattr(b, part).x)
        assert torch.equal(getattr(a, part).y, getattr(b, part).y)
    # the release folder itself may be given as the root, and the cifar10 dataset name reaches it
    c = load_dataset("cifar10", str(tmp_path / "bin" / "cifar-10-batches-bin"), clean_per_class=2, seed=3)
    assert torch.equal(c.clean.x, a.clean.x)


def test_cifar10_binary_with_a_broken_record(tmp_path: Path, fake_batches) -> None:  # noqa: ANN001
    folder = write_cifar_binary(tmp_path, fake_batches)
    with open(folder / "data_batch_3.bin", "ab") as fh:
        fh.write(b"\x00" * 10)
    with pytest.raises(DatasetError, match="3073 bytes"):
        load_cifar10(tmp_path, clean_per_class=2)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_cifar10_pickle_with_code_is_refused(tmp_path: Path, fake_batches) -> None:  # noqa: ANN001
    folder = write_cifar_python(tmp_path, fake_batches)
    marker = tmp_path / "pwned"
    x, y = fake_batches[2]
    evil = {b"labels": y, b"data": x, b"payload": _Exploit(marker)}
    (folder / "data_batch_3").write_bytes(pickle.dumps(evil, protocol=2))
    with pytest.raises(DatasetError, match=r"refusing to load .*system") as err:
        load_cifar10(tmp_path, clean_per_class=2)
    assert "data_batch_3" in str(err.value)
    assert not marker.exists(), "the pickled command ran"


def test_cifar10_test_batch_too_small_for_the_clean_pool(tmp_path: Path, fake_batches) -> None:  # noqa: ANN001
    write_cifar_python(tmp_path, fake_batches)
    with pytest.raises(DatasetError, match=r"too few images of classes \[0, 1, .*6 clean images per class"):
        load_cifar10(tmp_path, clean_per_class=TEST_PER_CLASS)
