"""Image sources, one registry: offline npz files, Debian's Fashion-MNIST, torchvision datasets, image folders.

Every source becomes an :class:`ImageDataset`: the whole dataset as uint8 tensors ``(N, C, H, W)`` with int64
labels, so the training path can index, crop and flip batches on the training device without PIL.

Spec strings accepted by :func:`load_dataset`:

- ``tinyimagenet32``, ``cifar10``, ``imagenette64``, ``omniglot_small``, ``mnist_test10k``: the offline npz
  files described in ``shared/data/MANIFEST.md``, found through :func:`resolve_data_root`.
- ``fashion_mnist``: the gz idx files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``), read directly with gzip + numpy (torchvision's checksums reject
  Debian's recompressed files), or a ``fashion-mnist/`` folder with the same files under a data root.
- ``npz:/path/file.npz`` (or any path ending in ``.npz``): a user's file in the MANIFEST layout.
- ``tv:NAME`` for torchvision datasets (``tv:cifar10``, ``tv:cifar100``, ``tv:svhn``, ``tv:stl10``, ``tv:mnist``,
  ``tv:kmnist``, ``tv:fashion_mnist``, ``tv:flowers102``, ``tv:fgvc_aircraft``, ``tv:stanford_cars``,
  ``tv:dtd``): read from a local copy under the data root; downloaded only when ``download=True``.
- ``folder:/path/root``: an ImageFolder tree with ``train/`` and ``val/`` (or ``test/``) subfolders, one folder
  per class (Tiny ImageNet's ``val/images`` + ``val_annotations.txt`` layout is understood too). This is how
  CUB-200, Stanford Dogs or the full Tiny ImageNet are brought in, as in the paper.

Data root resolution (:func:`resolve_data_root`): an explicit ``root`` argument (CLI ``--data-root``), else the
environment variable ``WORKBENCH_DATA``, else the first existing default among ``<repo>/../shared/data`` (the
offline copies next to the repository) and ``~/.cache/workbench/data``. An explicit root or ``WORKBENCH_DATA``
is the only place searched, so a wrong path fails loudly instead of silently falling back.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..errors import WorkbenchError

ENV_VAR = "WORKBENCH_DATA"
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test", "classes")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
# The released code resizes the fine-grained targets (CUB, Cars) to 84x84; variable-size sources use it too.
DEFAULT_VARIABLE_SIZE = 84
_MANIFEST_HINT = "expected keys x_train,y_train,x_test,y_test,classes (see shared/data/MANIFEST.md)"


# ----------------------------------------------------------------------------------------------------------------
# The dataset type
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ImageDataset:
    """A whole image-classification dataset in memory.

    ``x_train``/``x_test`` are uint8 tensors ``(N, C, H, W)``, ``y_train``/``y_test`` int64 ``(N,)`` with labels in
    ``0 .. num_classes-1``; ``classes`` names each label. ``flip`` says whether a horizontal flip is a valid
    augmentation (False for digits and characters). ``source`` says where the data came from.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: list[str]
    flip: bool = True
    source: str = ""
    class_words: list[str] | None = None

    def __post_init__(self) -> None:
        validate_arrays(self.name, self.x_train, self.y_train, self.x_test, self.y_test, self.classes,
                        fix="rebuild the dataset in the layout of shared/data/MANIFEST.md")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def grayscale(self) -> bool:
        return self.x_train.shape[1] == 1

    @property
    def channels(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(int(s) for s in self.x_train.shape[1:])  # type: ignore[return-value]

    def class_counts(self, split: str = "train") -> torch.Tensor:
        y = self.y_train if split == "train" else self.y_test
        return torch.bincount(y, minlength=self.num_classes)

    def summary(self) -> dict[str, Any]:
        """A JSON-able description (counts, shape, flags), e.g. for ``workbench data check``."""
        train_counts = self.class_counts("train")
        return {
            "name": self.name,
            "source": self.source,
            "train": int(self.x_train.shape[0]),
            "test": int(self.x_test.shape[0]),
            "num_classes": self.num_classes,
            "image_shape": list(self.image_shape),
            "grayscale": self.grayscale,
            "flip": self.flip,
            "train_per_class_min": int(train_counts.min()),
            "train_per_class_max": int(train_counts.max()),
        }

    def __repr__(self) -> str:
        c, h, w = self.image_shape
        return (f"ImageDataset({self.name!r}, train={self.x_train.shape[0]}, test={self.x_test.shape[0]}, "
                f"classes={self.num_classes}, image={c}x{h}x{w}, flip={self.flip})")


def validate_arrays(name: str, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
                    y_test: torch.Tensor, classes: list[str], fix: str) -> None:
    """Check dtypes, shapes and label ranges of an in-memory dataset; one-line WorkbenchError naming ``fix``."""
    if not classes:
        raise WorkbenchError(f"dataset {name} has no class names; {fix}")
    if len(classes) < 2:
        raise WorkbenchError(f"dataset {name} has {len(classes)} class ({classes[0]!r}); classification needs at least "
                             f"two classes (with one, every prediction is right): add images of another class")
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 4:
            got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
            raise WorkbenchError(f"dataset {name}: x_{split} must be a uint8 tensor (N, C, H, W), got {got}; {fix}")
        if x.shape[1] not in (1, 3):
            raise WorkbenchError(f"dataset {name}: x_{split} has {x.shape[1]} channels, expected 1 or 3; {fix}")
        if x.shape[2] < 1 or x.shape[3] < 1:
            raise WorkbenchError(f"dataset {name}: x_{split} holds {x.shape[2]}x{x.shape[3]} images; an image needs at "
                                 f"least one pixel per side; {fix}")
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.dim() != 1:
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise WorkbenchError(f"dataset {name}: y_{split} must be an int64 tensor (N,), got {got}; {fix}")
        if x.shape[0] != y.shape[0]:
            raise WorkbenchError(f"dataset {name}: x_{split} has {x.shape[0]} images but y_{split} has "
                                 f"{y.shape[0]} labels; {fix}")
        if x.shape[0] == 0:
            raise WorkbenchError(f"dataset {name}: the {split} split is empty; {fix}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= len(classes):
            raise WorkbenchError(f"dataset {name}: y_{split} has labels in [{lo}, {hi}] but there are "
                                 f"{len(classes)} classes (labels must be 0..{len(classes) - 1}); {fix}")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise WorkbenchError(f"dataset {name}: train images are {tuple(x_train.shape[1:])} but test images are "
                             f"{tuple(x_test.shape[1:])} (C, H, W); {fix}")
    present = torch.unique(y_train).numel()
    if present < 2:
        raise WorkbenchError(f"dataset {name}: every training image has label {int(y_train[0])}; classification "
                             f"needs training images of at least two classes (with one, every prediction is right)")


def _nhwc_to_nchw(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------------------------------------------
# Data roots
# ----------------------------------------------------------------------------------------------------------------
def repo_root() -> Path:
    """The checkout holding this package (``workbench/data/sources.py`` -> the directory above ``workbench``)."""
    return Path(__file__).resolve().parents[2]


def default_data_roots() -> list[Path]:
    """The documented defaults, in search order: ``<repo>/../shared/data``, then ``~/.cache/workbench/data``."""
    return [(repo_root().parent / "shared" / "data").resolve(), Path.home() / ".cache" / "workbench" / "data"]


def data_roots(root: str | os.PathLike | None = None) -> list[Path]:
    """Directories searched for data: ``[root]`` if given, else ``[$WORKBENCH_DATA]`` if set, else the defaults."""
    if root is not None and str(root) != "":
        return [Path(root).expanduser()]
    env = os.environ.get(ENV_VAR, "")
    if env:
        return [Path(env).expanduser()]
    return default_data_roots()


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root in force: ``root``, else ``$WORKBENCH_DATA``, else the first existing default directory.

    An explicit root or ``WORKBENCH_DATA`` that does not exist is an error. With neither given and no default
    present, ``~/.cache/workbench/data`` is returned (where downloads go) even though it does not exist yet.
    """
    candidates = data_roots(root)
    explicit = (root is not None and str(root) != "") or bool(os.environ.get(ENV_VAR))
    if explicit:
        path = candidates[0]
        if not path.is_dir():
            where = "--data-root/root argument" if root is not None and str(root) != "" else f"${ENV_VAR}"
            raise WorkbenchError(f"data root {path} (from {where}) is not a directory; create it or point it at "
                                 f"the folder holding the dataset files (e.g. shared/data)")
        return path
    for path in candidates:
        if path.is_dir():
            return path
    return candidates[-1]


def _download_root(root: str | os.PathLike | None) -> Path:
    """Where torchvision may write: the explicit/env root, else ``~/.cache/workbench/data`` (never shared/)."""
    if (root is not None and str(root) != "") or os.environ.get(ENV_VAR):
        return data_roots(root)[0]
    return default_data_roots()[-1]


def _searched(root: str | os.PathLike | None) -> str:
    return ", ".join(str(p) for p in data_roots(root))


# ----------------------------------------------------------------------------------------------------------------
# npz files
# ----------------------------------------------------------------------------------------------------------------
def load_npz(path: str | os.PathLike, name: str | None = None, flip: bool = True) -> ImageDataset:
    """Load and validate an npz file in the MANIFEST layout (uint8 NHWC images, integer labels, ``classes``)."""
    path = Path(path).expanduser()
    name = name or path.stem
    if not path.is_file():
        raise WorkbenchError(f"npz file {path} does not exist; check the path (expected a .npz in the layout of "
                             f"shared/data/MANIFEST.md)")
    if not zipfile.is_zipfile(path):
        raise WorkbenchError(f"npz file {path} is not an npz archive (no zip structure: truncated, corrupt or another "
                             f"format); copy it again or save it with numpy.savez_compressed")
    arrays: dict[str, np.ndarray] = {}
    try:
        with np.load(path, allow_pickle=False) as d:
            missing = [k for k in NPZ_KEYS if k not in d.files]
            if missing:
                raise WorkbenchError(f"npz file {path} lacks key {', '.join(repr(k) for k in missing)}; "
                                     f"{_MANIFEST_HINT}")
            for key in NPZ_KEYS + ("class_words",):
                if key in d.files:
                    arrays[key] = d[key]
    except WorkbenchError:
        raise
    except ValueError as exc:
        if "Object arrays" in str(exc):
            raise WorkbenchError(f"npz file {path} holds pickled object arrays; store every array plainly (e.g. "
                                 f"classes as np.array(names, dtype=str)) so it loads with allow_pickle=False") from None
        raise WorkbenchError(f"npz file {path} cannot be read ({_first_line(exc)}); it is truncated or not an npz: "
                             f"copy it again") from None
    except (zipfile.BadZipFile, EOFError, OSError, zlib.error, KeyError) as exc:
        raise WorkbenchError(f"npz file {path} cannot be read ({_first_line(exc)}); it is truncated or corrupt: "
                             f"copy it again") from None

    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            raise WorkbenchError(f"npz file {path}: x_{split} has dtype {x.dtype}, expected uint8 pixels 0..255 "
                                 f"(convert with np.clip(np.round(x * 255), 0, 255).astype(np.uint8) if in [0, 1])")
        if x.ndim != 4 or x.shape[3] not in (1, 3):
            raise WorkbenchError(f"npz file {path}: x_{split} has shape {x.shape}, expected (N, H, W, C) with C = 1 "
                                 f"or 3, channels last (add a trailing axis to gray images: x[..., None])")
        if x.shape[1] < 1 or x.shape[2] < 1:
            raise WorkbenchError(f"npz file {path}: x_{split} holds {x.shape[1]}x{x.shape[2]} images (shape "
                                 f"{x.shape}); an image needs at least one pixel per side (N, H, W, C)")
        if not np.issubdtype(y.dtype, np.integer):
            raise WorkbenchError(f"npz file {path}: y_{split} has dtype {y.dtype}, expected int64 labels "
                                 f"0..K-1 (convert with y.astype(np.int64))")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise WorkbenchError(f"npz file {path}: y_{split} has shape {y.shape} but x_{split} holds {x.shape[0]} "
                                 f"images; expected one label per image, shape ({x.shape[0]},)")
    classes = arrays["classes"]
    if classes.ndim != 1 or classes.dtype.kind not in "US" or classes.shape[0] == 0:
        raise WorkbenchError(f"npz file {path}: classes has dtype {classes.dtype} and shape {classes.shape}, "
                             f"expected a non-empty 1-D string array with one name per label")
    class_names = [str(c) for c in classes]
    for split in ("train", "test"):
        y = arrays[f"y_{split}"]
        if y.size and (int(y.min()) < 0 or int(y.max()) >= len(class_names)):
            raise WorkbenchError(f"npz file {path}: y_{split} has labels in [{int(y.min())}, {int(y.max())}] but "
                                 f"classes lists {len(class_names)} names; labels must be 0..{len(class_names) - 1}")
    words = arrays.get("class_words")
    return ImageDataset(
        name=name,
        x_train=_nhwc_to_nchw(arrays["x_train"]),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=_nhwc_to_nchw(arrays["x_test"]),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        classes=class_names,
        flip=flip,
        source=str(path),
        class_words=[str(w) for w in words] if words is not None and words.shape == classes.shape else None,
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ----------------------------------------------------------------------------------------------------------------
# Fashion-MNIST from Debian's gz idx files
# ----------------------------------------------------------------------------------------------------------------
def read_idx_gz(path: Path, expect_dims: int) -> np.ndarray:
    """Read one gz-compressed idx file (MNIST format) into a uint8 array, checking its header."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise WorkbenchError(f"idx file {path} cannot be read ({_first_line(exc)}); it is truncated or corrupt: "
                             f"reinstall it (apt-get install --reinstall dataset-fashion-mnist)") from None
    if len(raw) < 4 + 4 * expect_dims or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expect_dims:
        raise WorkbenchError(f"idx file {path} has no valid uint8 idx header with {expect_dims} dimensions; "
                             f"reinstall it (apt-get install --reinstall dataset-fashion-mnist)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expect_dims)]
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * expect_dims)
    if body.size != int(np.prod(dims)):
        raise WorkbenchError(f"idx file {path} holds {body.size} bytes of data but its header says {dims}; it is "
                             f"truncated: reinstall it (apt-get install --reinstall dataset-fashion-mnist)")
    return body.reshape(dims)


def _fashion_mnist_dirs(root: str | os.PathLike | None) -> list[Path]:
    return [p / "fashion-mnist" for p in data_roots(root)] + [DEBIAN_FASHION_MNIST]


def _find_fashion_mnist(root: str | os.PathLike | None) -> Path | None:
    for folder in _fashion_mnist_dirs(root):
        if all((folder / f).is_file() for f in FASHION_MNIST_FILES.values()):
            return folder
    return None


def load_fashion_mnist(root: str | os.PathLike | None = None) -> ImageDataset:
    """Fashion-MNIST (60,000 train / 10,000 test, 28x28 gray) from gz idx files, read with gzip + numpy."""
    folder = _find_fashion_mnist(root)
    if folder is None:
        raise WorkbenchError(
            f"Fashion-MNIST gz idx files not found in {', '.join(str(p) for p in _fashion_mnist_dirs(root))}; "
            f"install them with 'apt-get install dataset-fashion-mnist' (or use tv:fashion_mnist with --download)")
    arrays = {key: read_idx_gz(folder / fname, 3 if key.startswith("x") else 1)
              for key, fname in FASHION_MNIST_FILES.items()}
    return ImageDataset(
        name="fashion_mnist",
        x_train=torch.from_numpy(arrays["x_train"].copy()).unsqueeze(1),
        y_train=torch.from_numpy(arrays["y_train"].astype(np.int64)),
        x_test=torch.from_numpy(arrays["x_test"].copy()).unsqueeze(1),
        y_test=torch.from_numpy(arrays["y_test"].astype(np.int64)),
        classes=list(FASHION_MNIST_CLASSES),
        flip=True,  # garments are left-right symmetric; unlike digits, a mirrored item is the same class
        source=str(folder),
    )


# ----------------------------------------------------------------------------------------------------------------
# The registry of named sources
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """One named dataset: how to find and load it, and the counts its documentation promises."""

    name: str
    kind: str  # "offline" (npz in a data root), "debian" (system package), "torchvision"
    description: str
    loader: Callable[..., ImageDataset]
    locate: Callable[[Any], "Path | None"]
    how_to_get: str
    flip: bool = True
    train: int | None = None
    test: int | None = None
    num_classes: int | None = None
    image_shape: tuple[int, int, int] | None = None  # (C, H, W)


SOURCES: dict[str, SourceInfo] = {}


def register_source(info: SourceInfo) -> SourceInfo:
    """Add a named source to the registry (a new dataset is one call)."""
    if info.name in SOURCES:
        raise ValueError(f"dataset {info.name!r} is already registered")
    SOURCES[info.name] = info
    return info


def _find_npz(name: str, root: str | os.PathLike | None) -> Path | None:
    for folder in data_roots(root):
        path = folder / f"{name}.npz"
        if path.is_file():
            return path
    return None


def _offline_npz(name: str, description: str, train: int, test: int, num_classes: int,
                 image_shape: tuple[int, int, int], flip: bool) -> SourceInfo:
    def locate(root: Any) -> Path | None:
        return _find_npz(name, root)

    def loader(root: Any = None, **_: Any) -> ImageDataset:
        path = locate(root)
        if path is None:
            raise WorkbenchError(
                f"{name}.npz not found in {_searched(root)}; copy shared/data/{name}.npz there, or point "
                f"--data-root / ${ENV_VAR} at the folder holding it (see shared/data/MANIFEST.md)")
        ds = load_npz(path, name=name, flip=flip)
        got = (ds.x_train.shape[0], ds.x_test.shape[0], ds.num_classes, ds.image_shape)
        want = (train, test, num_classes, image_shape)
        if got != want:
            raise WorkbenchError(
                f"{path} has train={got[0]} test={got[1]} classes={got[2]} image={got[3]} but MANIFEST.md documents "
                f"train={train} test={test} classes={num_classes} image={image_shape}; the file is partial or "
                f"another version: copy it again from shared/data")
        return ds

    return SourceInfo(name=name, kind="offline", description=description, loader=loader, locate=locate,
                      how_to_get=f"copy shared/data/{name}.npz into the data root", flip=flip, train=train,
                      test=test, num_classes=num_classes, image_shape=image_shape)


register_source(_offline_npz("tinyimagenet32", "Tiny ImageNet, 60/20 per class, 64->32 (meta-training source)",
                             12000, 4000, 200, (3, 32, 32), flip=True))
register_source(_offline_npz("cifar10", "CIFAR-10 subset, 200/500 per class (JPEG re-encoded)",
                             2000, 5000, 10, (3, 32, 32), flip=True))
register_source(_offline_npz("imagenette64", "Imagenette v2, 100/50 per class, 64x64",
                             1000, 500, 10, (3, 64, 64), flip=True))
register_source(_offline_npz("omniglot_small", "Omniglot background-small, 242 characters, 15/5 drawers",
                             3630, 1210, 242, (1, 105, 105), flip=False))
register_source(_offline_npz("mnist_test10k", "MNIST official test set split 6,000/4,000",
                             6000, 4000, 10, (1, 28, 28), flip=False))
register_source(SourceInfo(
    name="fashion_mnist", kind="debian", description="Fashion-MNIST 60,000/10,000 (Debian dataset-fashion-mnist)",
    loader=lambda root=None, **_: load_fashion_mnist(root), locate=_find_fashion_mnist,
    how_to_get="apt-get install dataset-fashion-mnist", flip=True, train=60000, test=10000, num_classes=10,
    image_shape=(1, 28, 28)))


# ----------------------------------------------------------------------------------------------------------------
# torchvision datasets
# ----------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TorchvisionInfo:
    """How to build one torchvision dataset's train and test splits, and whether flips are valid."""

    name: str
    cls: str  # class name in torchvision.datasets
    train_kwargs: dict
    test_kwargs: dict
    folder: str  # the sub-folder torchvision keeps under its root (for a cheap "is a local copy there" check)
    flip: bool = True
    variable_size: bool = False  # images of different sizes: decoded and resized to one size at load time
    note: str = ""


TORCHVISION: dict[str, TorchvisionInfo] = {}


def _tv(info: TorchvisionInfo) -> None:
    TORCHVISION[info.name] = info


_tv(TorchvisionInfo("cifar10", "CIFAR10", {"train": True}, {"train": False}, "cifar-10-batches-py"))
_tv(TorchvisionInfo("cifar100", "CIFAR100", {"train": True}, {"train": False}, "cifar-100-python"))
_tv(TorchvisionInfo("svhn", "SVHN", {"split": "train"}, {"split": "test"}, "train_32x32.mat", flip=False,
                    note="needs scipy"))
_tv(TorchvisionInfo("stl10", "STL10", {"split": "train"}, {"split": "test"}, "stl10_binary"))
_tv(TorchvisionInfo("mnist", "MNIST", {"train": True}, {"train": False}, "MNIST", flip=False))
_tv(TorchvisionInfo("kmnist", "KMNIST", {"train": True}, {"train": False}, "KMNIST", flip=False))
_tv(TorchvisionInfo("fashion_mnist", "FashionMNIST", {"train": True}, {"train": False}, "FashionMNIST"))
_tv(TorchvisionInfo("flowers102", "Flowers102", {"split": "train"}, {"split": "test"}, "flowers-102",
                    variable_size=True, note="needs scipy"))
_tv(TorchvisionInfo("fgvc_aircraft", "FGVCAircraft", {"split": "trainval", "annotation_level": "variant"},
                    {"split": "test", "annotation_level": "variant"}, "fgvc-aircraft-2013b", variable_size=True))
_tv(TorchvisionInfo("stanford_cars", "StanfordCars", {"split": "train"}, {"split": "test"}, "stanford_cars",
                    variable_size=True, note="its download link is dead upstream: place a local copy; needs scipy"))
_tv(TorchvisionInfo("dtd", "DTD", {"split": "train"}, {"split": "test"}, "dtd", variable_size=True))


def _tv_labels(ds: Any) -> np.ndarray:
    for attr in ("targets", "labels", "_labels"):
        value = getattr(ds, attr, None)
        if value is not None:
            return np.asarray(value, dtype=np.int64).reshape(-1)
    samples = getattr(ds, "_samples", None) or getattr(ds, "samples", None)
    if samples:
        return np.asarray([s[1] for s in samples], dtype=np.int64)
    raise WorkbenchError(f"torchvision dataset {type(ds).__name__} exposes no labels this workbench knows; "
                         f"export it to an npz (see shared/data/MANIFEST.md) and load it with npz:PATH")


def _tv_arrays(ds: Any, info: TorchvisionInfo, image_size: int | None, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a torchvision dataset into (uint8 NCHW, int64) tensors without a per-image pass where possible."""
    y = torch.from_numpy(_tv_labels(ds))
    data = getattr(ds, "data", None)
    if data is not None and not info.variable_size:
        if isinstance(data, torch.Tensor):
            data = data.numpy()
        data = np.asarray(data)
        if data.ndim == 3:  # MNIST family: (N, H, W)
            x = torch.from_numpy(np.ascontiguousarray(data)).unsqueeze(1)
        elif data.shape[-1] in (1, 3) and data.shape[1] not in (1, 3):  # CIFAR: NHWC
            x = _nhwc_to_nchw(data)
        else:  # SVHN, STL10: NCHW already
            x = torch.from_numpy(np.ascontiguousarray(data))
        return x.to(torch.uint8), y
    samples = getattr(ds, "_image_files", None) or [s[0] for s in (getattr(ds, "_samples", None)
                                                                   or getattr(ds, "samples", None) or [])]
    if not samples:
        raise WorkbenchError(f"torchvision dataset {type(ds).__name__} lists no image files; check the local copy")
    x = decode_images([Path(p) for p in samples], image_size or DEFAULT_VARIABLE_SIZE, desc)
    return x, y


def _tv_local_root(info: TorchvisionInfo, root: str | os.PathLike | None) -> Path | None:
    """The first data root holding torchvision's files for this dataset (an existence check, not a full load)."""
    return next((folder for folder in data_roots(root) if (folder / info.folder).exists()), None)


def load_torchvision(name: str, root: str | os.PathLike | None = None, download: bool = False,
                     image_size: int | None = None) -> ImageDataset:
    """A torchvision dataset as an :class:`ImageDataset`; downloads only when ``download`` is True."""
    key = name.lower().replace("-", "_")
    if key not in TORCHVISION:
        raise WorkbenchError(f"unknown torchvision dataset {name!r}; known: {', '.join('tv:' + k for k in TORCHVISION)}")
    info = TORCHVISION[key]
    import torchvision.datasets as tvd

    cls = getattr(tvd, info.cls)
    tv_root = _download_root(root) if download else None
    if not download:
        tv_root = _tv_local_root(info, root)
        if tv_root is None:
            raise WorkbenchError(
                f"torchvision dataset {key} is not available offline (no local copy in {_searched(root)}); rerun with "
                f"download=True (CLI: --download) on a machine with a network, or put torchvision's copy (its "
                f"'{info.folder}') in --data-root / ${ENV_VAR}")
    else:
        tv_root.mkdir(parents=True, exist_ok=True)
    splits = []
    for split, kwargs in (("train", info.train_kwargs), ("test", info.test_kwargs)):
        try:
            ds = cls(root=str(tv_root), download=download, **kwargs)
        except ImportError as exc:
            raise WorkbenchError(f"torchvision dataset {key} needs the package {exc.name or 'scipy'}; install it with "
                                 f"pip install {exc.name or 'scipy'}") from None
        except RuntimeError as exc:
            raise WorkbenchError(
                f"torchvision dataset {key} not found or incomplete in {tv_root} ({_first_line(exc)}); rerun with "
                f"download=True (CLI: --download) on a machine with a network, or place a complete copy there") from None
        except Exception as exc:  # network failures surface as URLError, HTTPError, socket errors, ...
            raise WorkbenchError(
                f"torchvision dataset {key} could not be {'downloaded' if download else 'read'} into {tv_root} "
                f"({type(exc).__name__}: {_first_line(exc)}); check the network, or place a local copy there"
                + (f" ({info.note})" if info.note else "")) from None
        splits.append(_tv_arrays(ds, info, image_size, f"{key} {split}"))
        classes = getattr(ds, "classes", None)
    (x_train, y_train), (x_test, y_test) = splits
    num_classes = int(max(int(y_train.max()), int(y_test.max())) + 1)
    if not classes or len(classes) < num_classes:
        classes = [str(i) for i in range(num_classes)]
    return ImageDataset(name=f"tv:{key}", x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
                        classes=[str(c) for c in classes], flip=info.flip, source=str(tv_root))


# ----------------------------------------------------------------------------------------------------------------
# Image folders
# ----------------------------------------------------------------------------------------------------------------
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def decode_images(paths: list[Path], image_size: int | None, desc: str) -> torch.Tensor:
    """Decode image files with PIL into one uint8 tensor (N, C, S, S).

    With ``image_size`` the shorter side is resized to it and the centre square cropped (no distortion). Images are
    RGB unless every one of them is grayscale, then 1 channel. Without ``image_size`` all images must share a size.
    """
    from PIL import Image
    from tqdm.auto import tqdm

    arrays, gray = [], True
    for path in tqdm(paths, desc=f"decoding {desc}", unit="img", leave=False, disable=len(paths) < 500):
        try:
            with Image.open(path) as img:
                gray = gray and img.mode in ("1", "L", "I;16", "I", "F")
                img = img.convert("RGB")
                if image_size is not None:
                    w, h = img.size
                    scale = image_size / min(w, h)
                    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
                    img = img.resize((nw, nh), Image.BILINEAR)
                    left, top = (nw - image_size) // 2, (nh - image_size) // 2
                    img = img.crop((left, top, left + image_size, top + image_size))
                arrays.append(np.asarray(img, dtype=np.uint8))
        except OSError as exc:
            raise WorkbenchError(f"image {path} cannot be decoded ({_first_line(exc)}); remove or replace it") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise WorkbenchError(f"images in {desc} have different sizes (e.g. {a[1]}x{a[0]} and {b[1]}x{b[0]}); pass "
                             f"image_size=N (CLI: --image-size N) to resize them to NxN")
    x = _nhwc_to_nchw(np.stack(arrays))
    return x[:, :1].contiguous() if gray else x


def _class_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _files_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image_folder(path: str | os.PathLike, image_size: int | None = None, flip: bool = True,
                      name: str | None = None) -> ImageDataset:
    """An ImageFolder tree: ``train/<class>/*`` and ``val/<class>/*`` (or ``test/``) decoded into one tensor.

    Tiny ImageNet's layout (``val/images/*`` labelled by ``val/val_annotations.txt``) is read as well. Test classes
    are matched to train classes by folder name.
    """
    path = Path(path).expanduser()
    train_dir = path / "train"
    test_dir = next((path / d for d in ("val", "test") if (path / d).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise WorkbenchError(f"image folder {path} must contain train/ and val/ (or test/) subfolders with one folder "
                             f"per class; found {sorted(p.name for p in path.iterdir()) if path.is_dir() else 'nothing'}")
    classes = _class_folders(train_dir)
    if not classes:
        raise WorkbenchError(f"{train_dir} has no class folders; expected train/<class name>/<image files>")
    index = {c: i for i, c in enumerate(classes)}

    def gather(folder: Path) -> tuple[list[Path], list[int]]:
        files, labels = [], []
        annotations = folder / "val_annotations.txt"
        if annotations.is_file() and (folder / "images").is_dir():  # Tiny ImageNet's validation layout
            for line in annotations.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) >= 2 and parts[1] in index:
                    files.append(folder / "images" / parts[0])
                    labels.append(index[parts[1]])
                elif len(parts) >= 2:
                    raise WorkbenchError(f"{annotations} names class {parts[1]!r}, which has no folder in {train_dir}")
            return files, labels
        for cls in _class_folders(folder):
            if cls not in index:
                raise WorkbenchError(f"{folder / cls} is a class with no folder in {train_dir}; the splits must share "
                                     f"class folder names")
            found = _files_in(folder / cls)
            files += found
            labels += [index[cls]] * len(found)
        return files, labels

    parts = []
    for split, folder in (("train", train_dir), ("test", test_dir)):
        files, labels = gather(folder)
        if not files:
            raise WorkbenchError(f"{folder} holds no image files ({', '.join(sorted(IMAGE_SUFFIXES))}); check the path")
        parts.append((decode_images(files, image_size, f"{path.name}/{folder.name}"),
                      torch.tensor(labels, dtype=torch.int64)))
    (x_train, y_train), (x_test, y_test) = parts
    if x_train.shape[1] != x_test.shape[1]:  # one split all-gray, the other not: use RGB for both
        x_train, x_test = (x.expand(-1, 3, -1, -1).contiguous() if x.shape[1] == 1 else x for x in (x_train, x_test))
    return ImageDataset(name=name or f"folder:{path.name}", x_train=x_train, y_train=y_train, x_test=x_test,
                        y_test=y_test, classes=classes, flip=flip, source=str(path))


# ----------------------------------------------------------------------------------------------------------------
# One entry point
# ----------------------------------------------------------------------------------------------------------------
#: Spec prefixes and (what follows the colon, an example).
SPEC_PREFIXES = {"npz": ("a file path", "npz:/path/file.npz"), "tv": ("a dataset name", "tv:cifar100"),
                 "folder": ("a folder path", "folder:/path/root")}


def check_spec(spec: Any, what: str = "dataset spec") -> str:
    """The stripped ``spec`` if it is well formed (a name, ``npz:PATH``, ``tv:NAME``, ``folder:PATH`` or a path ending
    in ``.npz``), else a one-line WorkbenchError; nothing is loaded or looked up."""
    if not isinstance(spec, str) or not spec.strip():
        raise WorkbenchError(f"{what} must be a non-empty string, got {spec!r}; e.g. 'cifar10' or 'npz:/path.npz'")
    spec = spec.strip()
    kind, colon, rest = spec.partition(":")
    if colon and kind in SPEC_PREFIXES and not rest.strip():
        thing, example = SPEC_PREFIXES[kind]
        raise WorkbenchError(f"{what} {spec!r} is incomplete: '{kind}:' needs {thing} after the colon, e.g. {example}")
    return spec


def load_dataset(spec: str, root: str | os.PathLike | None = None, *, download: bool = False,
                 flip: bool | None = None, image_size: int | None = None) -> ImageDataset:
    """Load a dataset by spec (see the module docstring) into an :class:`ImageDataset`.

    ``root`` overrides the data root (else ``$WORKBENCH_DATA``, else the defaults). ``download`` lets torchvision
    fetch a missing ``tv:`` dataset; nothing is ever downloaded otherwise. ``flip`` overrides whether horizontal
    flips are valid (e.g. ``False`` for a user's npz of digits). ``image_size`` resizes variable-size sources
    (folders, Flowers102, Aircraft, Cars, DTD; default 84 for torchvision's) to a square at load time.
    """
    spec = check_spec(spec)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise WorkbenchError(f"image_size must be a positive integer, got {image_size!r}")
    kind, _, rest = spec.partition(":")
    if rest and kind == "npz":
        ds = load_npz(rest, flip=True if flip is None else flip)
        return ds
    if not rest and spec.endswith(".npz"):
        return load_npz(spec, flip=True if flip is None else flip)
    if rest and kind == "tv":
        ds = load_torchvision(rest, root=root, download=download, image_size=image_size)
    elif rest and kind == "folder":
        ds = load_image_folder(rest, image_size=image_size, flip=True if flip is None else flip)
    elif spec in SOURCES:
        ds = SOURCES[spec].loader(root)
    else:
        raise WorkbenchError(
            f"unknown dataset {spec!r}; use one of {', '.join(SOURCES)}, npz:/path/file.npz, folder:/path/root, or "
            f"one of {', '.join('tv:' + k for k in TORCHVISION)} (run 'workbench data list')")
    if flip is not None:
        ds.flip = bool(flip)
    return ds


def available_datasets(root: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    """Every named dataset with whether it can be loaded offline now, where from, and its documented counts.

    For ``tv:`` datasets availability means torchvision's folder for it exists under a data root (a cheap check;
    ``workbench data check tv:NAME`` does the full load).
    """
    out = []
    for info in SOURCES.values():
        where = info.locate(root)
        out.append({
            "name": info.name, "kind": info.kind, "available": where is not None,
            "location": str(where) if where else None, "train": info.train, "test": info.test,
            "num_classes": info.num_classes, "image_shape": list(info.image_shape) if info.image_shape else None,
            "flip": info.flip, "description": info.description, "how_to_get": info.how_to_get,
        })
    for info in TORCHVISION.values():
        where = _tv_local_root(info, root)
        out.append({
            "name": f"tv:{info.name}", "kind": "torchvision", "available": where is not None,
            "location": str(where / info.folder) if where else None, "train": None, "test": None,
            "num_classes": None, "image_shape": None, "flip": info.flip,
            "description": f"torchvision.datasets.{info.cls}" + (f" ({info.note})" if info.note else ""),
            "how_to_get": f"workbench data check tv:{info.name} --download (needs a network)",
        })
    return out
