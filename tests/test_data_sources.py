"""Sources: offline sets load with the documented counts, npz validation, data roots, torchvision, folders, CLI."""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.data import (ImageDataset, available_datasets, data_roots, load_dataset, register_cli,
                            resolve_data_root)
from workbench.data import sources
from workbench.errors import WorkbenchError

from helpers import require_shared

SHARED = sources.repo_root().parent / "shared" / "data"

# (train, test, classes, (C, H, W), flip, train per class, test per class) as documented in shared/data/MANIFEST.md
DOCUMENTED = {
    "tinyimagenet32": (12000, 4000, 200, (3, 32, 32), True, 60, 20),
    "cifar10": (2000, 5000, 10, (3, 32, 32), True, 200, 500),
    "imagenette64": (1000, 500, 10, (3, 64, 64), True, 100, 50),
    "omniglot_small": (3630, 1210, 242, (1, 105, 105), False, 15, 5),
    "mnist_test10k": (6000, 4000, 10, (1, 28, 28), False, None, None),
    "fashion_mnist": (60000, 10000, 10, (1, 28, 28), True, 6000, 1000),
}
# content sha256 from MANIFEST.md: x_train, y_train, x_test, y_test bytes in the file's NHWC layout
CONTENT_SHA = {
    "cifar10": "7c873fb45fb55dbb4d10c38678e1562a78b0c307d07906b127015a1702cfaa47",
    "mnist_test10k": "dbdf0d6485ff439e673c746a60891800122f3e9965e1806ef6757cc71287d6f6",
}


@pytest.fixture(autouse=True)
def _no_env_root(monkeypatch):
    monkeypatch.delenv("WORKBENCH_DATA", raising=False)


@pytest.mark.parametrize("name", list(DOCUMENTED))
def test_offline_source_loads_with_documented_counts(name):
    if name != "fashion_mnist":  # (Debian's dataset-fashion-mnist package, not shared/)
        require_shared(f"data/{name}.npz")
    train, test, k, shape, flip, per_train, per_test = DOCUMENTED[name]
    ds = load_dataset(name)
    assert isinstance(ds, ImageDataset) and ds.name == name
    assert ds.x_train.dtype == torch.uint8 and ds.x_test.dtype == torch.uint8
    assert ds.y_train.dtype == torch.int64 and ds.y_test.dtype == torch.int64
    assert tuple(ds.x_train.shape) == (train, *shape) and tuple(ds.x_test.shape) == (test, *shape)
    assert ds.y_train.shape == (train,) and ds.y_test.shape == (test,)
    assert ds.num_classes == k == len(ds.classes)
    assert ds.grayscale == (shape[0] == 1) and ds.flip == flip
    assert int(ds.y_train.min()) == 0 and int(ds.y_train.max()) == k - 1
    if per_train is not None:
        assert ds.class_counts("train").tolist() == [per_train] * k
        assert ds.class_counts("test").tolist() == [per_test] * k


def test_mnist_digit_counts_match_manifest():
    require_shared("data/mnist_test10k.npz")
    ds = load_dataset("mnist_test10k")
    assert ds.class_counts("train").tolist() == [581, 686, 623, 614, 588, 535, 554, 631, 573, 615]
    assert ds.class_counts("test").tolist() == [399, 449, 409, 396, 394, 357, 404, 397, 401, 394]


@pytest.mark.parametrize("name", list(CONTENT_SHA))
def test_loading_keeps_every_pixel(name):
    """Back in the file's NHWC layout, the loaded arrays hash to MANIFEST.md's content sha256."""
    require_shared(f"data/{name}.npz")
    ds = load_dataset(name)
    h = hashlib.sha256()
    for t in (ds.x_train.permute(0, 2, 3, 1), ds.y_train, ds.x_test.permute(0, 2, 3, 1), ds.y_test):
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    assert h.hexdigest() == CONTENT_SHA[name]


def test_tinyimagenet_carries_class_words():
    require_shared("data/tinyimagenet32.npz")
    ds = load_dataset("tinyimagenet32")
    assert ds.classes[0] == "n01443537" and ds.class_words is not None and "goldfish" in ds.class_words[0]


# ---------------------------------------------------------------------------------------------------------------
# npz validation
# ---------------------------------------------------------------------------------------------------------------
def _arrays(n_train=20, n_test=10, k=4, hw=8, c=3):
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.integers(0, 256, (n_train, hw, hw, c), dtype=np.uint8),
        "y_train": np.arange(n_train, dtype=np.int64) % k,
        "x_test": rng.integers(0, 256, (n_test, hw, hw, c), dtype=np.uint8),
        "y_test": np.arange(n_test, dtype=np.int64) % k,
        "classes": np.array([f"c{i}" for i in range(k)]),
    }


def _save(tmp_path, name="user.npz", **arrays):
    path = tmp_path / name
    np.savez_compressed(path, **arrays)
    return path


def _error(spec, **kwargs) -> str:
    with pytest.raises(WorkbenchError) as info:
        load_dataset(spec, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_user_npz_loads_by_path(tmp_path):
    arrays = _arrays()
    path = _save(tmp_path, **arrays)
    for spec in (f"npz:{path}", str(path)):
        ds = load_dataset(spec)
        assert ds.name == "user" and tuple(ds.x_train.shape) == (20, 3, 8, 8)
        assert torch.equal(ds.x_train.permute(0, 2, 3, 1), torch.from_numpy(arrays["x_train"]))
        assert ds.classes == ["c0", "c1", "c2", "c3"] and ds.flip
    assert not load_dataset(f"npz:{path}", flip=False).flip


def test_npz_missing_key(tmp_path):
    arrays = _arrays()
    del arrays["y_test"]
    path = _save(tmp_path, **arrays)
    msg = _error(f"npz:{path}")
    assert f"npz file {path} lacks key 'y_test'" in msg
    assert "expected keys x_train,y_train,x_test,y_test,classes (see shared/data/MANIFEST.md)" in msg


@pytest.mark.parametrize("change, expect", [
    (lambda a: a.update(x_train=a["x_train"].astype(np.float32) / 255), "x_train has dtype float32, expected uint8"),
    (lambda a: a.update(x_test=a["x_test"][..., 0]), "x_test has shape (10, 8, 8), expected (N, H, W, C)"),
    (lambda a: a.update(x_train=np.zeros((20, 8, 8, 4), np.uint8)), "expected (N, H, W, C) with C = 1 or 3"),
    (lambda a: a.update(y_train=a["y_train"].astype(np.float64)), "y_train has dtype float64, expected int64"),
    (lambda a: a.update(y_train=a["y_train"][:5]), "y_train has shape (5,) but x_train holds 20 images"),
    (lambda a: a.update(y_test=a["y_test"] + 3), "y_test has labels in [3, 6] but classes lists 4 names"),
    (lambda a: a.update(y_train=a["y_train"] - 1), "y_train has labels in [-1, 2]"),
    (lambda a: a.update(classes=np.arange(4)), "classes has dtype int64"),
])
def test_npz_bad_arrays(tmp_path, change, expect):
    arrays = _arrays()
    change(arrays)
    msg = _error(f"npz:{_save(tmp_path, **arrays)}")
    assert expect in msg, msg


def test_npz_with_pickled_objects(tmp_path):
    arrays = _arrays()
    arrays["classes"] = np.array(["a", 1, None, 2.0], dtype=object)
    msg = _error(f"npz:{_save(tmp_path, **arrays)}")
    assert "pickled object arrays" in msg and "allow_pickle=False" in msg


def test_npz_truncated_and_missing(tmp_path):
    path = _save(tmp_path, **_arrays())
    data = path.read_bytes()
    truncated = tmp_path / "cut.npz"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in _error(f"npz:{truncated}")
    damaged = tmp_path / "damaged.npz"  # zip directory intact, compressed image bytes overwritten
    middle = len(data) // 3
    damaged.write_bytes(data[:middle] + bytes(200) + data[middle + 200:])
    assert "truncated or corrupt" in _error(f"npz:{damaged}")
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    assert "copy it again" in _error(f"npz:{garbage}")
    assert "does not exist" in _error(f"npz:{tmp_path / 'absent.npz'}")


def test_named_partial_file_is_refused(tmp_path):
    """A cifar10.npz with the wrong counts (a partial copy) is caught against MANIFEST.md's numbers."""
    _save(tmp_path, "cifar10.npz", **_arrays(hw=32))
    msg = _error("cifar10", root=tmp_path)
    assert "MANIFEST.md documents train=2000" in msg and "copy it again" in msg


def test_named_missing_file_says_how_to_get_it(tmp_path):
    msg = _error("tinyimagenet32", root=tmp_path)
    assert f"tinyimagenet32.npz not found in {tmp_path}" in msg and "shared/data/tinyimagenet32.npz" in msg


def test_unknown_spec_lists_choices():
    msg = _error("cifar11")
    assert "unknown dataset 'cifar11'" in msg and "tinyimagenet32" in msg and "tv:cifar100" in msg


# ---------------------------------------------------------------------------------------------------------------
# Data roots
# ---------------------------------------------------------------------------------------------------------------
def test_default_root_is_shared_data_next_to_the_repo_not_cwd(tmp_path, monkeypatch):
    require_shared("data/mnist_test10k.npz")
    monkeypatch.chdir(tmp_path)
    assert data_roots()[0] == SHARED.resolve()
    assert data_roots()[1] == Path.home() / ".cache" / "workbench" / "data"
    assert resolve_data_root() == SHARED.resolve()
    assert load_dataset("mnist_test10k").source == str(SHARED.resolve() / "mnist_test10k.npz")


def test_env_root_and_explicit_root(tmp_path, monkeypatch):
    require_shared("data/mnist_test10k.npz", "data/cifar10.npz")
    shutil.copy(SHARED / "mnist_test10k.npz", tmp_path / "mnist_test10k.npz")
    monkeypatch.setenv("WORKBENCH_DATA", str(tmp_path))
    assert resolve_data_root() == tmp_path
    assert load_dataset("mnist_test10k").source == str(tmp_path / "mnist_test10k.npz")
    # the environment root is the only place searched: a file that is only in shared/ is not found
    assert f"cifar10.npz not found in {tmp_path}" in _error("cifar10")
    # an explicit root wins over the environment
    assert load_dataset("cifar10", root=SHARED).source == str(SHARED / "cifar10.npz")
    with pytest.raises(WorkbenchError, match="is not a directory"):
        resolve_data_root(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST idx files
# ---------------------------------------------------------------------------------------------------------------
def test_fashion_mnist_truncated_files_are_refused(tmp_path):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    for fname in sources.FASHION_MNIST_FILES.values():
        (folder / fname).write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"\x00" * 3))
    msg = _error("fashion_mnist", root=tmp_path)
    assert "truncated" in msg and "apt-get install --reinstall dataset-fashion-mnist" in msg


def test_fashion_mnist_missing_everywhere(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    assert "apt-get install dataset-fashion-mnist" in _error("fashion_mnist", root=tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# torchvision
# ---------------------------------------------------------------------------------------------------------------
def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_torchvision_absent_offline_is_one_line_error(tmp_path):
    for name in ("cifar100", "svhn", "stl10", "flowers102"):
        msg = _error(f"tv:{name}", root=tmp_path)
        assert f"torchvision dataset {name} is not available offline" in msg and "download=True" in msg


def test_torchvision_download_failure_is_one_line_error(tmp_path, monkeypatch):
    """With download=True and no network, torchvision's URLError becomes one line (simulated: no network used)."""
    import urllib.error

    import torchvision.datasets

    class Offline:
        def __init__(self, root, download=False, **kwargs):
            assert download and root == str(tmp_path)
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR100", Offline)
    msg = _error("tv:cifar100", root=tmp_path, download=True)
    assert f"torchvision dataset cifar100 could not be downloaded into {tmp_path}" in msg and "URLError" in msg


def test_torchvision_mnist_from_local_copy(tmp_path):
    """torchvision's own MNIST reader on a tiny local copy (raw idx files); nothing is downloaded."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    x_tr, y_tr = rng.integers(0, 256, (12, 28, 28)), np.arange(12) % 10
    x_te, y_te = rng.integers(0, 256, (5, 28, 28)), np.arange(5)
    _write_idx(raw / "train-images-idx3-ubyte", x_tr)
    _write_idx(raw / "train-labels-idx1-ubyte", y_tr)
    _write_idx(raw / "t10k-images-idx3-ubyte", x_te)
    _write_idx(raw / "t10k-labels-idx1-ubyte", y_te)
    ds = load_dataset("tv:mnist", root=tmp_path)
    assert ds.name == "tv:mnist" and not ds.flip and ds.num_classes == 10
    assert tuple(ds.x_train.shape) == (12, 1, 28, 28) and tuple(ds.x_test.shape) == (5, 1, 28, 28)
    assert torch.equal(ds.x_train[:, 0], torch.from_numpy(x_tr.astype(np.uint8)))
    assert ds.y_test.tolist() == y_te.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Image folders
# ---------------------------------------------------------------------------------------------------------------
def _png(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, value, value)).save(path)


def test_image_folder(tmp_path):
    for split, n in (("train", 3), ("val", 2)):
        for label, cls in enumerate(("bird", "cat")):
            for i in range(n):
                _png(tmp_path / split / cls / f"{i}.png", (20 + 4 * i, 16), 50 + 100 * label)
    msg = _error(f"folder:{tmp_path}")
    assert "different sizes" in msg and "image_size" in msg
    ds = load_dataset(f"folder:{tmp_path}", image_size=12)
    assert ds.classes == ["bird", "cat"] and tuple(ds.x_train.shape) == (6, 3, 12, 12) and len(ds.y_test) == 4
    # every image is constant, so its label can be read back from its pixels
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert torch.equal(x[:, 0, 6, 6].long(), 50 + 100 * y)


def test_image_folder_tiny_imagenet_layout_and_gray(tmp_path):
    for cls in ("n01", "n02"):
        for i in range(2):
            _png(tmp_path / "train" / cls / "images" / f"{cls}_{i}.JPEG", (8, 8), 10, mode="L")
    lines = []
    for i, cls in enumerate(("n02", "n01", "n02")):
        _png(tmp_path / "val" / "images" / f"val_{i}.JPEG", (8, 8), 10, mode="L")
        lines.append(f"val_{i}.JPEG\t{cls}\t0\t0\t8\t8")
    (tmp_path / "val" / "val_annotations.txt").write_text("\n".join(lines))
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.grayscale and tuple(ds.x_train.shape) == (4, 1, 8, 8)
    assert ds.y_test.tolist() == [1, 0, 1]


def test_image_folder_without_splits(tmp_path):
    (tmp_path / "train").mkdir()
    assert "must contain train/ and val/ (or test/)" in _error(f"folder:{tmp_path}")


# ---------------------------------------------------------------------------------------------------------------
# Listing and the CLI
# ---------------------------------------------------------------------------------------------------------------
def test_available_datasets_reports_offline_sets():
    require_shared(*(f"data/{name}.npz" for name in DOCUMENTED if name != "fashion_mnist"))
    rows = {r["name"]: r for r in available_datasets()}
    for name, (train, test, k, shape, *_rest) in DOCUMENTED.items():
        assert rows[name]["available"], name
        assert (rows[name]["train"], rows[name]["test"], rows[name]["num_classes"]) == (train, test, k)
    assert rows["tv:cifar100"]["kind"] == "torchvision"
    json.dumps(list(rows.values()))


def _cli(argv):
    parser = argparse.ArgumentParser(prog="workbench")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_list_and_check(capsys):
    require_shared("data/omniglot_small.npz", "data/mnist_test10k.npz")
    assert _cli(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "tinyimagenet32" in out and "fashion_mnist" in out and "tv:svhn" in out
    assert _cli(["data", "check", "omniglot_small"]) == 0
    out = capsys.readouterr().out
    assert "omniglot_small: ok" in out and "train 3,630 images, test 1,210 images, 242 classes" in out
    assert "horizontal flip off" in out
    assert _cli(["data", "check", "mnist_test10k", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train"] == 6000
    with pytest.raises(WorkbenchError, match="not available offline"):
        _cli(["data", "check", "tv:cifar100", "--data-root", os.fspath(SHARED)])
