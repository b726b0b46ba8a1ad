"""Bad input through the CLI: one line ``error: ...`` on stderr naming the problem, a non-zero exit, and nothing
written under the artifacts root (every check runs before a run folder is made).

Each case runs ``workbench transfer`` or ``workbench meta-train`` in-process on tiny data written into a temporary
folder (npz files in the layout of ``shared/data/MANIFEST.md``) with tiny phi files.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.cli import main
from workbench.config import parse_overrides
from workbench.errors import WorkbenchError
from workbench.meta_train import MetaTrainConfig
from workbench.perturb import MetaPerturb
from workbench.transfer import TransferConfig


# ------------------------------------------------------------------------------------------------ tiny inputs
def write_npz(path: Path, classes: int = 3, per_class: int = 12, test_per_class: int = 4, size: int = 16,
              channels: int = 1, names: int | None = None, labels=None) -> Path:
    """An npz in the MANIFEST layout: uint8 (N, H, W, C) images, int64 labels, one class name per label."""
    rng = np.random.default_rng(0)
    y_train = np.repeat(np.arange(classes), per_class).astype(np.int64) if labels is None else labels
    y_test = np.repeat(np.arange(classes), test_per_class).astype(np.int64)
    np.savez(path, x_train=rng.integers(0, 256, (len(y_train), size, size, channels), dtype=np.uint8),
             y_train=y_train, x_test=rng.integers(0, 256, (len(y_test), size, size, channels), dtype=np.uint8),
             y_test=y_test, classes=np.array([f"c{i}" for i in range(names or classes)], dtype=str))
    return path


def phi_state(fill: float | None = None) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    state = {k: v.clone() for k, v in MetaPerturb(init_std=0.2).state_dict().items()}
    if fill is not None:
        state["noise1.w_identity"][0, 0, 1, 1] = fill
    return state


def save_phi(path: Path, state) -> Path:
    torch.save({"format": "workbench.metaperturb", "version": 1, "state_dict": state, "metadata": {}}, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    good = phi_state()
    mixed = {**good, 3: torch.zeros(1)}
    official_mixed = {"phi_1.w_identity": torch.zeros(1, 1, 3, 3), 5: torch.zeros(1)}
    torch.save({**good, 7: torch.zeros(1)}, d / "mixed_top.pt")
    torch.save(official_mixed, d / "mixed_official.pt")
    torch.save({"weight": torch.zeros(3)}, d / "not_phi.pt")
    return {
        "ok": str(write_npz(d / "ok.npz")),
        "one_class": str(write_npz(d / "one_class.npz", classes=1)),
        "one_label": str(write_npz(d / "one_label.npz", names=3, labels=np.zeros(36, dtype=np.int64))),
        "empty_images": str(write_npz(d / "empty_images.npz", size=0)),
        "meta": str(write_npz(d / "meta.npz", classes=4, per_class=24, channels=3)),
        "meta_empty_images": str(write_npz(d / "meta_empty_images.npz", classes=4, per_class=24, channels=3, size=0)),
        "meta_one_class": str(write_npz(d / "meta_one_class.npz", classes=1, per_class=48, channels=3)),
        "missing_npz": str(d / "absent.npz"),
        "good_phi": str(save_phi(d / "good.pt", good)),
        "nan_phi": str(save_phi(d / "nan.pt", phi_state(float("nan")))),
        "inf_phi": str(save_phi(d / "inf.pt", phi_state(float("inf")))),
        "int_phi": str(save_phi(d / "int.pt", {k: v.round().long() for k, v in good.items()})),
        "shape_phi": str(save_phi(d / "shape.pt", {**good, "scale_kernels": torch.zeros(3, 1, 3, 3)})),
        "list_phi": str(save_phi(d / "list.pt", list(good.values()))),
        "mixed_phi": str(save_phi(d / "mixed.pt", mixed)),
        "mixed_top_phi": str(d / "mixed_top.pt"),
        "mixed_official_phi": str(d / "mixed_official.pt"),
        "not_phi": str(d / "not_phi.pt"),
        "missing_phi": str(d / "absent.pt"),
    }


TRANSFER = dict(target="npz:{ok}", phi="{good_phi}", arch="conv4_8", image_size=16, steps=2, batch_size=8,
                eval_every=0, eval_mc_samples=2, final_mc_samples=2, train_eval_examples=0, device="cpu", threads=1)
META = dict(source="npz:{meta}", arch="conv4_8", num_tasks=2, image_size=16, batch_size=8, steps=1,
            checkpoint_every=1, log_every=1, device="cpu", threads=1)


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def run_cli(command: str, base: dict, changes: dict, files: dict, root: Path) -> int:
    settings = {**base, **changes}
    args = [command, "--artifacts", str(root), "--no-progress"]
    for key, value in settings.items():
        args += ["--set", f"{key}={str(value).format(**files)}"]
    return main(args)


def assert_one_line_error(code: int, err: str, expect: str) -> None:
    assert code != 0, "bad input was accepted"
    assert err.startswith("error: "), err
    assert err.count("\n") == 1 and err.endswith("\n"), f"not exactly one line: {err!r}"
    assert expect in err, err


# ------------------------------------------------------------------------------------------------ transfer
TRANSFER_CASES = {
    # phi files: damaged values and foreign layouts
    "nan phi": (dict(phi="{nan_phi}"), "parameter noise1.w_identity holds 1 NaN or infinite value(s)"),
    "inf phi": (dict(phi="{inf_phi}"), "parameter noise1.w_identity holds 1 NaN or infinite value(s)"),
    "integer phi": (dict(phi="{int_phi}"), "expected floating point"),
    "phi state is a list": (dict(phi="{list_phi}"), "phi's state is a list, not a mapping"),
    "phi state mixes key types": (dict(phi="{mixed_phi}"), "does not hold phi's parameters"),
    "phi file mixes key types": (dict(phi="{mixed_top_phi}"), "is not a phi file"),
    "release-like phi mixes key types": (dict(phi="{mixed_official_phi}"), "is not a MetaPerturb release"),
    "phi of wrong shape": (dict(phi="{shape_phi}"), "parameter scale_kernels has shape (3, 1, 3, 3)"),
    "phi is not a phi": (dict(phi="{not_phi}"), "is not a phi file"),
    "phi path missing": (dict(phi="{missing_phi}"), "neither 'official', a phi file, nor a run id"),
    # datasets
    "one-class npz": (dict(target="npz:{one_class}", method="base"), "needs at least two classes"),
    "npz whose training images share one label": (dict(target="npz:{one_label}", method="base"),
                                                  "training images of at least two classes"),
    "npz of 0x0 images": (dict(target="npz:{empty_images}", method="base"), "x_train holds 0x0 images"),
    "npz missing": (dict(target="npz:{missing_npz}", method="base"), "does not exist"),
    "npz spec without a path": (dict(target="npz:", method="base"), "'npz:' needs a file path after the colon"),
    "tv spec without a name": (dict(target="tv:", method="base"), "'tv:' needs a dataset name after the colon"),
    "unknown dataset": (dict(target="cifar11", method="base"), "unknown dataset 'cifar11'"),
    # numbers out of range
    "image_size=1": (dict(image_size=1, method="base"), "image_size must be an integer from 8 to 512"),
    "image_size=513": (dict(image_size=513, method="base"), "image_size must be an integer from 8 to 512"),
    "threads=0": (dict(threads=0, method="base"), "threads must be a positive integer or null"),
    "threads=-1": (dict(threads=-1, method="base"), "threads must be a positive integer or null"),
    "seed=-1": (dict(seed=-1, method="base"), "seed must be an integer from 0 to"),
    "seed=2**70": (dict(seed=2**70, method="base"), "seed must be an integer from 0 to"),
    "batch_size=1": (dict(batch_size=1, method="base"), "batch_size must be at least 2"),
    "lr=inf": (dict(lr=".inf", method="base"), "lr must be a finite number > 0"),
    "steps=-3": (dict(steps=-3, method="base"), "steps must be >= 1"),
    # names
    "unknown method": (dict(method="dropconnect"), "unknown method 'dropconnect'"),
    "unknown arch": (dict(arch="resnet21", method="base"), "unknown model 'resnet21'"),
    "unknown torchvision arch": (dict(arch="tv:nope", method="base"), "unknown torchvision model 'tv:nope'"),
    "normalization=0.7": (dict(normalization=0.7, method="base"), "must be one of ['dataset', '0.5'], got float 0.7"),
    "unknown field": (dict(stepz=3), "unknown TransferConfig parameter(s) ['stepz']"),
    "bad device": (dict(device="tpu", method="base"), "device 'tpu'"),
}




# ------------------------------------------------------------------------------------------------ meta-train
META_CASES = {
    "unknown arch": (dict(arch="nope"), "unknown model 'nope'"),
    "unknown torchvision arch": (dict(arch="tv:nope"), "unknown torchvision model 'tv:nope'"),
    "source of 0x0 images": (dict(source="npz:{meta_empty_images}"), "x_train holds 0x0 images"),
    "one-class source": (dict(source="npz:{meta_one_class}"), "needs at least two classes"),
    "one class per task": (dict(num_tasks=8), "leaving at least two classes per task); use num_tasks in {2, 4}"),
    "source spec without a path": (dict(source="npz:"), "'npz:' needs a file path after the colon"),
    "source missing": (dict(source="npz:{missing_npz}"), "does not exist"),
    "selection target missing": (dict(num_runs=2, select_target="npz:{missing_npz}"), "does not exist"),
    "image_size=4": (dict(image_size=4), "image_size must be an integer from 8 to 512"),
    "image_size=513": (dict(image_size=513), "image_size must be an integer from 8 to 512"),
    "threads=0": (dict(threads=0), "threads must be a positive integer or null"),
    "seed=-1": (dict(seed=-1), "seed must be an integer from 0 to"),
    "split_seed=2**70": (dict(split_seed=2**70), "split_seed must be an integer from 0 to"),
    "steps=0": (dict(steps=0), "steps must be a positive integer"),
    "unknown field": (dict(stpes=3), "unknown MetaTrainConfig parameter(s) ['stpes']"),
}


STAGE_CASES = [("transfer", TRANSFER, *case) for case in TRANSFER_CASES.values()] + \
              [("meta-train", META, *case) for case in META_CASES.values()]


@pytest.mark.parametrize("command, settings, changes, expect", STAGE_CASES,
                         ids=[f"transfer: {k}" for k in TRANSFER_CASES] + [f"meta-train: {k}" for k in META_CASES])
def test_a_stage_refuses_bad_input_in_one_line_and_writes_nothing(command, settings, changes, expect, files, tmp_path,
                                                                   capsys):
    root = tmp_path / "artifacts"
    root.mkdir()
    before = listing(root)
    code = run_cli(command, settings, changes, files, root)
    assert_one_line_error(code, capsys.readouterr().err, expect)
    assert listing(root) == before


# ------------------------------------------------------------------------------------------------ data check
@pytest.mark.parametrize("name, expect", [("empty_images", "x_train holds 0x0 images"),
                                          ("one_class", "needs at least two classes"),
                                          ("one_label", "training images of at least two classes")])
def test_data_check_refuses_what_training_would_refuse(name, expect, files, capsys):
    code = main(["data", "check", f"npz:{files[name]}"])
    assert_one_line_error(code, capsys.readouterr().err, expect)


# ------------------------------------------------------------------------------------------------ values as text
@pytest.mark.parametrize("command, base", [("transfer", TRANSFER), ("meta-train", META)])
def test_normalization_half_given_as_a_number_is_accepted(command, base, files, tmp_path, capsys):
    """``--set normalization=0.5`` arrives from YAML as a float; the run then fails only on the (missing) data."""
    key = "target" if command == "transfer" else "source"
    code = run_cli(command, base, {"normalization": 0.5, key: "npz:{missing_npz}"}, files, tmp_path / "artifacts")
    err = capsys.readouterr().err
    assert code != 0 and "does not exist" in err and "normalization" not in err
    assert TransferConfig.from_dict({"normalization": 0.5}).normalization == "0.5"
    assert MetaTrainConfig.from_dict({"normalization": 0.5}).normalization == "0.5"


def test_image_size_bounds_are_inclusive():
    for size in (8, 512):
        assert TransferConfig.from_dict({"image_size": size}).image_size == size
        assert MetaTrainConfig.from_dict({"image_size": size}).image_size == size
    for size in (7, 513):
        with pytest.raises(WorkbenchError, match="from 8 to 512"):
            TransferConfig.from_dict({"image_size": size})


def test_overrides_keep_a_trailing_colon_as_text_and_flow_mappings_as_mappings():
    assert parse_overrides(["target=npz:", "method_options={p: 0.3}", "steps=3", "phi=tv: x"]) == {
        "target": "npz:", "method_options": {"p": 0.3}, "steps": 3, "phi": {"tv": "x"}}
    with pytest.raises(WorkbenchError, match=r"got the mapping \{'tv': 'x'\} \(YAML reads 'key: value' as a mapping\)"):
        TransferConfig.from_dict({"target": {"tv": "x"}})


# ------------------------------------------------------------------------------------------------ phi state
def test_phi_state_is_checked_wherever_it_is_loaded(files):
    MetaPerturb.load(files["good_phi"])  # the control: a sound phi loads
    for name in ("nan_phi", "inf_phi", "int_phi", "list_phi", "mixed_phi", "mixed_top_phi", "mixed_official_phi"):
        with pytest.raises(WorkbenchError) as info:
            MetaPerturb.load(files[name])
        assert "\n" not in str(info.value), name
    with pytest.raises(WorkbenchError, match="network run-x: parameter scale_fc.weight holds 1 NaN"):
        state = phi_state()
        state["scale_fc.weight"][0, 0] = float("nan")
        MetaPerturb.from_state_dict(state, "network run-x")
