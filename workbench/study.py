"""Papermill studies: the typed configs of the study notebooks, profiles, the runner and ``workbench study``.

A *study* is one executed notebook of ``notebooks/`` with one set of parameters. Each notebook declares its typed
config in its metadata (``metadata.workbench.config``): ``01_meta_train`` uses
:class:`workbench.meta_train.MetaTrainConfig`, the others the study configs defined here
(:class:`TransferStudyConfig`, :class:`CalibrationStudyConfig`, :class:`ScalesStudyConfig`, :class:`ExploreConfig`).
The notebook's cell tagged ``parameters`` lists exactly that config's fields with their defaults; the next cell
validates whatever papermill injected (:func:`notebook_config`): an unknown name or an ill-typed value stops the
notebook with one line, even under plain ``papermill``, which only warns about unknown names.

A *profile* (``notebooks/profiles/<name>.yaml``) maps notebook names to parameters: ``smoke`` (seconds, for the
tests), ``demo`` (minutes on a laptop CPU), ``paper`` (the paper's budgets, for a GPU) and ``results`` (the results
study). ``workbench study run NOTEBOOK... --profile P [-p KEY VALUE]...``:

1. validates every notebook's parameters (profile + overrides) against its config before anything runs
   (a bad parameter: one line, exit status 2, nothing written);
2. for each notebook in turn creates a study record (``<artifacts>/studies/<study id>/study.json``: notebook,
   profile, the full parameters, versions, git revision), executes the notebook with papermill in a kernel
   running this Python (the kernel gets ``WORKBENCH_STUDY_ID``, so every run it creates is linked to the study),
   streams the kernel's output and progress bars to the console, saves the executed notebook into the study
   folder (atomically, also when a cell fails, with the error visible), and marks the study finished or failed;
3. stops at the first failed notebook (later ones usually read its results) with exit status 1.

Every notebook of one command is its own study; a later notebook finds the earlier one's results through
``phi="latest"`` / ``source_study="latest"`` (the newest finished meta-training run / transfer study).
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import importlib
import json
import math
import os
import re
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import yaml

from .artifacts import RunRecord, RunStore, Study, StudyRecord, default_root, to_jsonable
from .config import Config, require
from .errors import WorkbenchError
from .labels import labels_for, method_label, phi_verdict
from .transfer import TransferConfig, TransferRecipe

STUDY_ENV = "WORKBENCH_STUDY_ID"
ARTIFACTS_ENV = "WORKBENCH_ARTIFACTS"
PROGRESS_ENV = "WORKBENCH_PROGRESS"  # "text": plain tqdm bars (the runner streams them to its console)
REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO / "notebooks"
PROFILES_DIR = NOTEBOOKS_DIR / "profiles"
REPORT_KIND = "study_report"
TRANSFER_NOTEBOOK = "02_transfer_study"
OFFICIAL = "official"
LATEST = "latest"
INTERACTIVE_PROFILE = "interactive"
KERNEL_START_TIMEOUT = 300  # seconds; a loaded 2-core machine needs more than papermill's default 60


class ParameterError(WorkbenchError):
    """A notebook parameter is unknown or ill-typed. Shown in a notebook as this one line, without a traceback."""

    def _render_traceback_(self) -> list[str]:  # IPython prints these lines instead of the traceback
        return [f"{type(self).__name__}: {self}"]


class StudyError(WorkbenchError):
    """A study cannot proceed (no source study, no meta-trained phi ...). One line in a notebook, too."""

    def _render_traceback_(self) -> list[str]:
        return [f"{type(self).__name__}: {self}"]


# ============================================================================================ study configs
def _parse_method(spec: str) -> tuple[str, Optional[str]]:
    """``"metaperturb@official"`` -> ``("metaperturb", "official")``; ``"base"`` -> ``("base", None)``."""
    name, _, phi = str(spec).partition("@")
    return name.strip(), (phi.strip() or None) if _ else None


@dataclass
class TransferStudyConfig(TransferRecipe):
    """The grid of ``02_transfer_study``: targets x archs x methods x seeds, one transfer run each, every run with
    this config's recipe (the :class:`~workbench.transfer.TransferRecipe` fields: steps, batch_size, lr, ...,
    documented there), so any recipe setting is a study parameter. The study's own defaults differ from a single
    run's in four: per_class 200, eval_every 0, robust_norms ``[linf]`` (for ``robust_targets`` only) and
    checkpoint_every null (one checkpoint, at the end of training).

    targets: dataset specs (``cifar10``, ``fashion_mnist``, ``imagenette64``, ``mnist_test10k``, ``omniglot_small``
        ...). per_class_by_target: exceptions to per_class by target. test_per_class: evaluate on the first N test
        images of each class (null: the whole test split; a class with fewer keeps all of its own); the same
        images for every method and seed.
    archs: registered models (``resnet20``, ``conv4``, ``conv4_32``).
    methods: registered regularizers; a method that uses phi takes the study's ``phi`` unless written
        ``name@phi`` (``metaperturb@official``: the authors' released phi). method_options: per method name.
    phi: our phi: ``latest`` (the newest finished meta-training run of the artifacts root), a run id or a file.
    seeds: one run per seed.
    robust_targets: targets whose runs are also attacked with PGD (``robust_norms`` and the robust_* settings).
    workers: cells run at once (null: what is fastest here: one worker per core, one thread each, on a CPU; one
        per GPU on GPUs); 1 runs them one after another in the notebook's own process. executor: ``local``
        (worker processes on this machine) or ``ray`` (tasks on the Ray cluster at ``ray_address``, else
        ``$RAY_ADDRESS``, else a local Ray instance; every node must see the artifacts root at the same path).
        retries: further attempts for a cell that fails or whose worker dies, before it is reported as failed.
        These four choose where cells run, never what they compute; a resumed study may change them.
    regime_check: what the grid does when the first Base run of an (arch, target) ends underfit (train-test gap
        under ``OVERFIT_GAP``): ``warn`` (print and go on), ``stop`` (end the study there, before the other
        methods spend their time) or ``off``. That run is the pilot: list ``base`` first in ``methods`` so it
        comes before the others.
    """

    per_class: Optional[int] = 200
    eval_every: int = 0
    robust_norms: list[str] = field(default_factory=lambda: ["linf"])
    checkpoint_every: Optional[int] = None
    targets: list[str] = field(default_factory=lambda: ["cifar10", "fashion_mnist"])
    per_class_by_target: dict[str, Any] = field(default_factory=lambda: {"fashion_mnist": 500})
    archs: list[str] = field(default_factory=lambda: ["resnet20"])
    methods: list[str] = field(default_factory=lambda: ["base", "metaperturb", "metaperturb@official"])
    method_options: dict[str, Any] = field(default_factory=dict)
    phi: str = LATEST
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    robust_targets: list[str] = field(default_factory=list)
    regime_check: str = "warn"
    workers: Optional[int] = None
    executor: str = "local"
    ray_address: Optional[str] = None
    retries: int = 1

    def validate(self) -> None:
        from .fanout import check_execution
        from .regularizers import build_regularizer

        super().validate()
        check_execution(self.workers, self.executor, self.retries)
        require(self.regime_check in REGIME_CHECKS,
                f"regime_check must be one of {', '.join(REGIME_CHECKS)}, got {self.regime_check!r}")

        for name in ("targets", "archs", "methods", "seeds"):
            values = getattr(self, name)
            require(len(values) > 0, f"{name} must list at least one entry")
            require(len(set(map(str, values))) == len(values), f"{name} lists an entry twice: {values}")
        require(all(s >= 0 for s in self.seeds), f"seeds must be non-negative integers, got {self.seeds}")
        from .data import SOURCES, TORCHVISION

        known = set(SOURCES) | {f"tv:{name}" for name in TORCHVISION}
        for target, value in self.per_class_by_target.items():
            # an entry for a known dataset the grid does not train on is harmless (e.g. the default's
            # fashion_mnist with targets=[cifar10]); anything else is a typo
            require(target in self.targets or target in known,
                    f"per_class_by_target names {target!r}, which is neither among targets {self.targets} nor a "
                    f"known dataset; fix the name or remove it")
            require(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 1),
                    f"per_class_by_target[{target!r}] must be a positive integer or null, got {value!r}")
        for target in self.robust_targets:
            require(target in self.targets, f"robust_targets names {target!r}, which is not among targets "
                                            f"{self.targets}")
        require(self.phi.strip() != "", "phi must be 'latest', 'official', a meta-train run id or a phi file")
        names = [_parse_method(m)[0] for m in self.methods]
        for key, options in self.method_options.items():
            require(key in names, f"method_options names {key!r}, which is not among methods {names}")
            require(isinstance(options, Mapping), f"method_options[{key!r}] must be a mapping of option -> value")
        for spec in self.methods:
            name, phi = _parse_method(spec)
            require(bool(name), f"method {spec!r} has no name; write e.g. metaperturb@official")
            reg = build_regularizer(name, self.method_options.get(name) or {})
            require(phi is None or reg.needs_phi, f"method {spec!r}: only methods that use phi take '@phi' "
                                                  f"({name} does not)")
        # every cell of the grid must make a valid TransferConfig (bad archs, options, norms: one line, now)
        for target in self.targets:
            for spec in self.methods:
                self.transfer_config(target, self.archs[0], spec, self.seeds[0], phi=OFFICIAL)
        from .models import build

        for arch in self.archs:  # an unknown architecture: one line now, not after the first runs
            build(arch, 2, in_channels=3, image_size=self.image_size)

    @classmethod
    def field_names(cls) -> list[str]:
        """The grid's own fields first, then the recipe's (the order of the notebook's parameters cell)."""
        recipe = set(TransferRecipe.recipe_fields()) - {"per_class", "test_per_class"}
        names = super().field_names()
        return [n for n in names if n not in recipe] + [n for n in names if n in recipe]

    def per_class_for(self, target: str) -> Optional[int]:
        return self.per_class_by_target[target] if target in self.per_class_by_target else self.per_class

    def transfer_config(self, target: str, arch: str, method_spec: str, seed: int, phi: str) -> TransferConfig:
        """The :class:`TransferConfig` of one grid cell (``phi``: the resolved phi for methods that use one): the
        study's recipe, with this target's per_class and robustness, and the cell."""
        name, own_phi = _parse_method(method_spec)
        recipe = self.recipe()
        recipe["per_class"] = self.per_class_for(target)
        recipe["robust_norms"] = list(self.robust_norms) if target in self.robust_targets else []
        recipe["test_per_class"] = None  # the grid cuts the test split itself (limit_test): smaller classes whole
        return TransferConfig.from_dict({**recipe, "target": target, "arch": arch, "method": name,
                                         "method_options": dict(self.method_options.get(name) or {}),
                                         "phi": own_phi or phi, "seed": int(seed)})


@dataclass
class CalibrationStudyConfig(Config):
    """``03_calibration_robustness``: calibration and PGD robustness of the runs of a transfer study.

    source_study: a ``02_transfer_study`` study id, or ``latest`` (the newest finished one of the artifacts root).
    targets / archs / methods: keep only these (empty: all); methods are names or labels
        (``metaperturb``, ``metaperturb (official)``).
    robust_target: the target whose PGD curves are shown (null: every target that has them).
    """

    source_study: str = LATEST
    targets: list[str] = field(default_factory=list)
    archs: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    robust_target: Optional[str] = None
    artifacts_root: Optional[str] = None

    def validate(self) -> None:
        require(self.source_study.strip() != "", "source_study must be a study id or 'latest'")


@dataclass
class ScalesStudyConfig(Config):
    """``04_scales``: per-layer, per-channel perturbation scales of the MetaPerturb runs of a transfer study.

    source_study: a ``02_transfer_study`` study id, or ``latest``. targets / archs / methods: filters (empty: all).
    max_heatmaps: at most this many sites x channels heatmaps (one per arch, target and phi, seeds averaged).
    """

    source_study: str = LATEST
    targets: list[str] = field(default_factory=list)
    archs: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    max_heatmaps: int = 6
    artifacts_root: Optional[str] = None

    def validate(self) -> None:
        require(self.source_study.strip() != "", "source_study must be a study id or 'latest'")
        require(self.max_heatmaps >= 0, f"max_heatmaps must be >= 0, got {self.max_heatmaps}")


EXPLORE_STATISTICS = ("mean term", "variance term", "logit", "m1", "m2", "m3", "m4", "v1", "v2", "v3", "v4")


@dataclass
class ExploreConfig(Config):
    """``05_explore_phi``: what phi does at one site of a network, for one batch (``workbench.explore``).

    phi / compare: ``official`` (the authors' phi), ``latest`` (the newest finished meta-training run), a meta-train
        run id or a phi file; ``untrained`` (the untrained control of ``phi``: the phi its run started from, a fresh
        seed-0 phi for the authors') or ``untrained:<spec>``. compare: the phi shown beside it (null: none).
    network: the trained network of a finished run (``latest``: the newest finished transfer run; a run id; a
        ``checkpoints/model.pt`` file), or null for a fresh ``arch`` initialised from ``seed``.
    dataset: the images (null: the network's target, else ``cifar10``); split, batch_size and batch pick the batch
        (images ``batch * batch_size`` onward), image the one whose maps are shown; image_size: the side images are
        resized to for a fresh network (a trained one uses its own).
    site: the perturbation site (forward order); channels: the channels whose maps are shown.
    noise_coeff: k in ``h * (1 + k (s z - 1))``. statistic: the channel statistic the scale is plotted against.
    seed: the fresh network's initialisation and the noise draw (both phis get the same noise).
    """

    phi: str = "official"
    compare: Optional[str] = "untrained"
    network: Optional[str] = None
    arch: str = "resnet20"
    dataset: Optional[str] = None
    split: str = "test"
    image_size: int = 32
    batch_size: int = 16
    batch: int = 0
    image: int = 0
    site: int = 0
    channels: list[int] = field(default_factory=lambda: [0, 1, 2, 3])
    noise_coeff: float = 1.0
    statistic: str = "mean term"
    seed: int = 0
    data_root: Optional[str] = None
    artifacts_root: Optional[str] = None

    def validate(self) -> None:
        require(self.phi.strip() != "", "phi must be 'official', 'latest', 'untrained', a meta-train run id or a file")
        require(self.split in ("train", "test"), f"split must be 'train' or 'test', got {self.split!r}")
        require(self.batch_size >= 2, f"batch_size must be >= 2 (phi's scale uses the batch variance), got "
                                      f"{self.batch_size}")
        require(self.batch >= 0, f"batch must be >= 0, got {self.batch}")
        require(0 <= self.image < self.batch_size, f"image must be an index into the batch (0 .. "
                                                   f"{self.batch_size - 1}), got {self.image}")
        require(self.site >= 0, f"site must be >= 0, got {self.site}")
        require(len(self.channels) > 0 and all(c >= 0 for c in self.channels),
                f"channels must list at least one channel index >= 0, got {self.channels}")
        require(0.0 <= self.noise_coeff <= 2.0, f"noise_coeff must be in [0, 2], got {self.noise_coeff}")
        require(self.statistic in EXPLORE_STATISTICS,
                f"statistic must be one of {', '.join(EXPLORE_STATISTICS)}; got {self.statistic!r}")
        require(self.image_size >= 4, f"image_size must be >= 4, got {self.image_size}")
        require(self.seed >= 0, f"seed must be >= 0, got {self.seed}")


# ================================================================================= notebooks and profiles
def config_class(path: str) -> type[Config]:
    """The config class named ``module:Class`` (as written in a notebook's ``metadata.workbench.config``)."""
    module_name, _, class_name = str(path).partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise WorkbenchError(f"config class {path!r} cannot be imported; write it as 'package.module:ClassName'") \
            from None
    if not (isinstance(cls, type) and issubclass(cls, Config)):
        raise WorkbenchError(f"{path!r} is not a workbench Config class")
    return cls


def config_path(cls: type[Config]) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def available_notebooks(folder: Path = NOTEBOOKS_DIR) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("[0-9]*.ipynb"))


def resolve_notebook(spec: str | os.PathLike) -> Path:
    """A notebook path from a path, a name (``02_transfer_study``) or its number (``02``)."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix == ".ipynb" or os.sep in text:
        if path.is_file():
            return path.resolve()
        raise WorkbenchError(f"notebook {text} does not exist; available: {', '.join(available_notebooks())}")
    names = available_notebooks()
    matches = [n for n in names if n == text] or [n for n in names if n.split("_", 1)[0] == text or
                                                  n.startswith(text)]
    if len(matches) != 1:
        what = "is ambiguous" if matches else "is not a notebook"
        raise WorkbenchError(f"{text!r} {what}; give one of {', '.join(names)} (or a path to a .ipynb file)")
    return (NOTEBOOKS_DIR / f"{matches[0]}.ipynb").resolve()


def notebook_config_class(path: Path) -> type[Config]:
    """The typed config a notebook declares in ``metadata.workbench.config``."""
    import nbformat

    try:
        nb = nbformat.read(str(path), as_version=4)
    except Exception as exc:  # not JSON, not a notebook
        raise WorkbenchError(f"{path} is not a readable notebook ({str(exc).splitlines()[0][:120]})") from None
    declared = (nb.metadata.get("workbench") or {}).get("config")
    if not declared:
        raise WorkbenchError(f"notebook {path.name} does not declare its config (metadata.workbench.config, e.g. "
                             "'workbench.study:TransferStudyConfig'); study notebooks are built by notebooks/_build.py")
    return config_class(declared)


def available_profiles(folder: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in Path(folder).glob("*.yaml"))


def profile_path(profile: str | os.PathLike) -> Path:
    """``notebooks/profiles/<profile>.yaml`` for a name, or the given YAML file."""
    text = str(profile)
    path = Path(text).expanduser()
    if path.suffix in (".yaml", ".yml") or os.sep in text:
        if path.is_file():
            return path.resolve()
        raise WorkbenchError(f"profile file {text} does not exist")
    candidate = PROFILES_DIR / f"{text}.yaml"
    if not candidate.is_file():
        raise WorkbenchError(f"no profile {text!r}; available: {', '.join(available_profiles())} "
                             f"(files in {PROFILES_DIR}) or a path to a YAML file")
    return candidate


def read_profile(profile: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The whole profile: notebook name -> parameters."""
    path = profile_path(profile)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise WorkbenchError(f"profile {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, Mapping) or not all(isinstance(v, Mapping) or v is None for v in data.values()):
        raise WorkbenchError(f"profile {path} must map notebook names to mappings of parameters")
    return {str(k): dict(v or {}) for k, v in data.items()}


def load_profile(profile: str | os.PathLike, notebook: str) -> dict[str, Any]:
    """The parameters a profile gives one notebook, e.g. ``load_profile("demo", "02_transfer_study")``.

    In JupyterLab: ``globals().update(load_profile("demo", "02_transfer_study"))`` right after the parameters
    cell steps through the notebook with the demo budget.
    """
    data = read_profile(profile)
    name = Path(str(notebook)).stem
    if name not in data:
        raise WorkbenchError(f"profile {profile_path(profile).name} has no entry for notebook {name!r}; it has "
                             f"{', '.join(data) or 'none'} (add '{name}: {{}}' for the defaults)")
    return data[name]


def _literal(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_literal(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _literal(v) for k, v in value.items())
    return False


def notebook_config(cls: type[Config], namespace: Mapping[str, Any], before: set[str] | frozenset[str]) -> Config:
    """Validate a notebook's parameters: the names bound since the ``before`` snapshot (taken just before the
    ``parameters`` cell) are the parameters cell's and papermill's injected ones.

    A new name that is not a field of ``cls`` is refused (papermill only warns about it), as is an ill-typed
    value: :class:`ParameterError` with the message of :meth:`Config.from_dict`, e.g. ``unknown
    TransferStudyConfig parameter(s) ['bogus']; valid names are: ...`` or ``config field 'steps' must be an
    integer, got str 'ten'``. Names starting with ``_`` and names bound to non-literal objects (the notebook's own
    results when a cell is re-run by hand) are not parameters: papermill can only inject literals.
    """
    fields = set(cls.field_names())
    given = {name: value for name, value in namespace.items()
             if name not in before and not name.startswith("_") and (name in fields or _literal(value))}
    try:
        return cls.from_dict(given)
    except WorkbenchError as exc:
        raise ParameterError(str(exc)) from None


def parameters_source(cls: type[Config]) -> str:
    """The source of a notebook's ``parameters`` cell: every field of ``cls`` with its default and type."""
    hints = typing.get_type_hints(cls)
    lines = [f"# Parameters: exactly the fields of {cls.__name__} (defaults shown); papermill injects overrides "
             "after this cell."]
    default = cls()
    for name in cls.field_names():
        value = getattr(default, name)
        value = str(value) if isinstance(value, Path) else value
        lines.append(f"{name} = {value!r}  # {_type_name(hints[name])}")
    return "\n".join(lines)


def _type_name(annotation: Any) -> str:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(inner) + (" | None" if type(None) in args else "")
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in args)}]" if args else origin.__name__
    return getattr(annotation, "__name__", str(annotation))


# ============================================================================================ the session
class StudyRunStore(RunStore):
    """A run store whose new runs belong to one study (``create_run`` defaults ``study_id`` to it)."""

    def __init__(self, root: str | os.PathLike | None, study_id: str, **kwargs: Any):
        super().__init__(root, **kwargs)
        self.study_id = study_id

    def create_run(self, kind, config, tags=None, run_id=None, study_id=None):
        return super().create_run(kind, config, tags=tags, run_id=run_id, study_id=study_id or self.study_id)


@dataclass
class StudySession:
    """A notebook's link to its study: the store to write runs into and the study record.

    Under ``workbench study run`` the runner owns the study (it marks it finished or failed after saving the
    executed notebook); in JupyterLab the session creates a study of profile ``interactive`` and
    :meth:`finish` marks it finished.
    """

    notebook: str
    store: StudyRunStore
    study: Study
    managed: bool

    @property
    def study_id(self) -> str:
        return self.study.study_id

    def finish(self) -> None:
        """End of the notebook: an interactive study is marked finished (the runner does its own)."""
        runs = len(self.study.run_ids)
        if not self.managed:
            self.study.mark_finished()
        print(f"study {self.study_id} ({self.notebook}): {runs} run(s) under {self.store.root}")


def _use_text_progress() -> None:
    """Plain tqdm bars (stderr text) instead of widgets: the runner streams them to its console."""
    import tqdm.auto
    import tqdm.std

    tqdm.auto.tqdm = tqdm.std.tqdm
    tqdm.auto.trange = tqdm.std.trange


def open_session(notebook: str, config: Config) -> StudySession:
    """Open the study a notebook writes into (see :class:`StudySession`) and set up progress and plotting."""
    root = getattr(config, "artifacts_root", None)
    study_id = os.environ.get(STUDY_ENV)
    if os.environ.get(PROGRESS_ENV) == "text":
        _use_text_progress()
    with contextlib.suppress(ImportError):
        import plotly.io as pio

        # The figure's JSON only: JupyterLab and VS Code render it offline; no 4 MB of plotly.js per notebook.
        pio.renderers.default = os.environ.get("WORKBENCH_PLOTLY_RENDERER", "plotly_mimetype")
    if study_id:
        store = StudyRunStore(root, study_id)
        study = store.open_study(study_id)
        managed = True
    else:
        plain = RunStore(root)
        study = plain.create_study(f"notebooks/{notebook}.ipynb", INTERACTIVE_PROFILE, config.to_dict())
        store = StudyRunStore(root, study.study_id)
        managed = False
    print(f"study {study.study_id} ({'run by workbench study run' if managed else 'interactive'}); "
          f"artifacts {store.root}")
    return StudySession(notebook, store, study, managed)


def save_report(session: StudySession, name: str, tables: Mapping[str, Any], info: Mapping[str, Any] | None = None,
                arrays: Mapping[str, Mapping[str, Any]] | None = None, tags: Mapping[str, Any] | None = None) -> str:
    """Store what a notebook computed as a run of kind ``study_report`` linked to its study.

    tables: name -> pandas DataFrame (saved as ``records/<name>.json``, a list of row objects);
    info: saved as ``records/info.json``; arrays: name -> dict of arrays (``arrays/<name>.npz``).
    Returns the run id.
    """
    run = session.store.create_run(REPORT_KIND, {"notebook": session.notebook, **dict(info or {})},
                                   tags={"notebook": session.notebook, **dict(tags or {})})
    with run:
        for key, frame in tables.items():
            run.save_json(key, json.loads(frame.to_json(orient="records")))
        if info:
            run.save_json("info", info)
        for key, values in (arrays or {}).items():
            run.save_arrays(key, **values)
        run.mark_finished({"tables": sorted(tables), "arrays": sorted(arrays or {}),
                           "rows": {k: int(len(v)) for k, v in tables.items()}})
    return run.run_id


# ========================================================================================= reading results
# The readers and tables of the notebooks live in the results layer (workbench/results.py), shared with the
# reports and the dashboard; they are re-exported here, so ``study.summarize(...)`` etc. keep working.
from .results import (  # noqa: E402,F401
    MetaHistory, ScaleData, describe_meta, find_study, meta_history, paired_differences, regime_table,
    reliability_groups, robustness_table, scale_data, study_runs, summarize, wide,
)


# ========================================================================================== 02: the grid
def latest_phi_run(store: RunStore) -> Optional[RunRecord]:
    """The newest finished meta-training result of a store: a ``meta_select`` run, or a ``meta_train`` run that is
    not one of a selection's candidates; None if there is none."""
    candidates = [r for r in store.list_runs(kind="meta_select") if r.status == "finished"]
    candidates += [r for r in store.list_runs(kind="meta_train") if r.status == "finished" and "parent" not in r.tags]
    candidates = [r for r in candidates if (r.path / "phi.pt").is_file()]
    if not candidates:
        return None
    return max(candidates, key=lambda r: (r.finished or r.created or "", r.run_id))


def resolve_study_phi(spec: str, store: RunStore) -> str:
    """The phi spec a grid passes to transfer: ``latest`` becomes that run's id; others are checked and kept."""
    from .transfer import resolve_phi

    if spec == LATEST:
        record = latest_phi_run(store)
        if record is None:
            raise StudyError(f"phi='latest' but there is no finished meta-training run under {store.root}; run "
                             "notebooks/01_meta_train.ipynb first (workbench study run 01 --profile demo), or set "
                             "phi to 'official', a meta-train run id or a phi file")
        return record.run_id
    resolve_phi(spec, store)  # one line now if the phi does not exist, rather than after the first runs
    return spec


def limit_test(ds: Any, per_class: Optional[int]) -> Any:
    """The dataset with its test split cut to the first ``per_class`` images of every class (all if fewer)."""
    import torch

    if per_class is None:
        return ds
    y = ds.y_test
    keep = torch.zeros(len(y), dtype=torch.bool)
    for label in range(ds.num_classes):
        keep[torch.nonzero(y == label).flatten()[:per_class]] = True
    index = torch.nonzero(keep).flatten()
    return dataclasses.replace(ds, x_test=ds.x_test[index], y_test=ds.y_test[index])


REGIME_CHECKS = ("warn", "stop", "off")


def underfit_message(target: str, arch: str, seed: int, train: Optional[float], test: float) -> Optional[str]:
    """The warning for a Base run whose training-set accuracy is under ``OVERFIT_GAP`` above its test accuracy
    (None when it overfits, or when it has no training-set evaluation to judge by)."""
    from .results import OVERFIT_GAP, UNDERFIT

    if train is None or train != train or train - test >= OVERFIT_GAP:
        return None
    return (f"Base on {target} / {arch} (seed {seed}) ends at {train:.1%} on its training images and {test:.1%} on "
            f"test, a gap of {100 * (train - test):.1f} points (under {100 * OVERFIT_GAP:.0f}): {UNDERFIT}; train "
            f"longer (steps) or on fewer images (per_class) for a budget where Base overfits")


def grid_cells(config: TransferStudyConfig) -> list[tuple[str, str, int, str]]:
    """(target, arch, seed, method spec) of every run, in the order they are made."""
    return [(t, a, s, m) for t in config.targets for a in config.archs for s in config.seeds for m in config.methods]


def cell_run_id(study_id: str, target: str, arch: str, seed: int, spec: str) -> str:
    """The run id of one grid cell: fixed by the study and the cell, so that a resumed study finds the run an
    earlier session made (or began) instead of starting another. Readable like a generated id: the study's
    creation time, ``transfer``, target, arch, method and seed, and four hex digits of a hash of the rest."""
    import hashlib

    from .artifacts import slug

    name, phi = _parse_method(spec)
    digest = hashlib.sha1(f"{study_id}|{target}|{arch}|{seed}|{spec}".encode()).hexdigest()[:4]
    stamp = study_id[:15] if re.match(r"\d{8}-\d{6}", study_id) else slug(study_id)[:24]
    method = name + (f"-{slug(phi)[:12]}" if phi else "")
    parts = [stamp, "transfer", slug(target)[:24], slug(arch)[:24], slug(method)[:36], f"s{seed}"]
    return f"{'-'.join(p.strip('-') for p in parts)[:110]}-{digest}"


#: Seconds per million (training step x image x pixel) of a Conv-4 cell on one CPU thread here: the demo's cells
#: (600 steps of 64 images of 32x32, 30 MC samples) took about 40 s.
SECONDS_PER_MEGA_PIXEL_STEP = 1.0


def estimated_grid_seconds(config: TransferStudyConfig) -> float:
    """A rough serial time of the grid on one CPU thread, only to decide whether worker processes would pay for
    their start-up (:func:`workbench.fanout.plan_workers`); a GPU or a deeper network shifts it, not the choice."""
    work = config.steps * config.batch_size * config.image_size ** 2 / 1e6
    return len(grid_cells(config)) * work * SECONDS_PER_MEGA_PIXEL_STEP


_CELL_DATA: dict[tuple, Any] = {}  # the target dataset of this process's last cell: one target in memory at a time


def _cell_dataset(target: str, data_root: Optional[str], test_per_class: Optional[int]) -> Any:
    from .data import load_dataset

    key = (target, data_root, test_per_class)
    if key not in _CELL_DATA:
        _CELL_DATA.clear()
        _CELL_DATA[key] = limit_test(load_dataset(target, root=data_root), test_per_class)
    return _CELL_DATA[key]


def transfer_cell(payload: Mapping[str, Any], context: Any) -> dict[str, Any]:
    """One grid cell, in whichever process runs it: its run made, resumed from its checkpoint, started again (a
    run cut short before its first checkpoint), or read when an earlier session finished it. Returns the run id,
    its summary and which of those happened."""
    from .transfer import TransferConfig, transfer

    store = StudyRunStore(payload["root"], payload["study_id"])
    run_id = payload["run_id"]
    values = {**payload["config"], "run_name": run_id, "threads": context.threads}
    if values.get("device") in ("auto", "cuda") or str(values.get("device")).startswith("cuda"):
        values["device"] = context.device
    config = TransferConfig.from_dict(values)
    dataset = _cell_dataset(config.target, config.data_root, payload["test_per_class"])
    progress = bool(payload.get("progress"))
    if not os.path.lexists(store.runs_dir / run_id):
        how = "new"
        result = transfer(config, store, progress=progress, dataset=dataset)
    else:
        record = store.run_record(run_id)
        if record.status == "finished":
            return {"run_id": run_id, "summary": store.open_run(run_id).summary, "how": "done"}
        if record.status != "corrupt" and store.open_run(run_id).has_checkpoint("last"):
            how = "resumed"
            result = transfer(config, store, progress=progress, resume=run_id, dataset=dataset)
        else:
            how = "restarted"
            store.discard_run(run_id)  # cut short before its first checkpoint: nothing to keep
            result = transfer(config, store, progress=progress, dataset=dataset)
    return {"run_id": result.run_id, "summary": result.summary, "how": how}


def run_transfer_grid(config: TransferStudyConfig, store: RunStore, progress: bool = True):
    """Train every cell of the grid (one transfer run each, written to ``store``) and return one row per run, in
    grid order: run_id, target, arch, seed, method, phi, label, test_accuracy, test_nll, test_ece, mc_samples,
    train_examples, test_examples, train_seconds.

    Cells run as ``config.workers`` / ``executor`` say (see :mod:`workbench.fanout`). Each writes the run id
    :func:`cell_run_id` gives, so a grid run again in the same study (``workbench study resume``, or the cell run
    again in JupyterLab) keeps the finished runs and resumes or restarts the others. A cell that still fails
    after ``retries`` further attempts does not stop the others; the grid then ends with a StudyError naming it."""
    import pandas as pd

    from .fanout import Cell, plan_workers, run_cells
    from .regularizers import build_regularizer

    uses_ours = any(_parse_method(m)[1] is None and build_regularizer(_parse_method(m)[0]).needs_phi
                    for m in config.methods)
    ours = resolve_study_phi(config.phi, store) if uses_ours else None
    verdict = phi_verdict(store, ours) if uses_ours else None
    if uses_ours:
        print(f"our phi: {ours}" + (f" (phi='latest')" if config.phi == LATEST else ""))
        if verdict is not None and not verdict["learned"]:
            print(f"warning: our phi {verdict['message']}; its rows are labelled so")
    study_id = getattr(store, "study_id", None)
    if not study_id:
        raise StudyError("run_transfer_grid needs the study's store (session.store): its cells are runs of a study")
    plan = plan_workers(config.workers, config.threads, config.device, len(grid_cells(config)),
                        executor=config.executor, address=config.ray_address,
                        serial_seconds=estimated_grid_seconds(config))
    print(f"{len(grid_cells(config))} cells; {plan.describe()}")
    cells: list[Cell] = []
    meta: dict[str, tuple[str, str, int, str]] = {}
    pilots: dict[tuple[str, str], str] = {}
    for target, arch, seed, spec in grid_cells(config):
        run_id = cell_run_id(study_id, target, arch, seed, spec)
        meta[run_id] = (target, arch, seed, spec)
        if _parse_method(spec)[0] == "base" and config.regime_check != "off":
            pilots.setdefault((target, arch), run_id)
        # with regime_check=stop the other methods of an (arch, target) wait for its pilot's verdict
        pilot = pilots.get((target, arch))
        after = (pilot,) if config.regime_check == "stop" and pilot and pilot != run_id else ()
        payload = {"root": str(store.root), "study_id": study_id, "run_id": run_id,
                   "config": config.transfer_config(target, arch, spec, seed, phi=ours or OFFICIAL).to_dict(),
                   "test_per_class": config.test_per_class, "progress": progress and not plan.parallel}
        cells.append(Cell(run_id, f"{target} {arch} {spec} seed {seed}", payload, after))
    # A pilot listed after other methods of its (arch, target) still gates nothing it comes after, as serially.
    pilot_ids = set(pilots.values())
    regime_warnings: dict[str, str] = {}  # by pilot; listed in grid order whatever order the cells finish in

    def on_result(cell: Cell, value: Mapping[str, Any]) -> None:
        if cell.key not in pilot_ids:
            return
        target, arch, seed, _ = meta[cell.key]
        s = value["summary"]
        message = underfit_message(target, arch, seed, s.get("train_eval_accuracy"), s["test_accuracy"])
        if message and config.regime_check == "stop":
            raise StudyError(f"{message}; stopped (regime_check=stop; regime_check=warn runs the grid anyway)")
        if message:
            regime_warnings[cell.key] = message
            print(f"warning: {message}")

    outcomes = run_cells(cells, transfer_cell, plan, retries=config.retries, on_result=on_result,
                         progress=progress, desc="transfer grid")
    kept = sum(o.status == "finished" and o.value["how"] == "done" for o in outcomes.values())
    if kept:
        print(f"{kept} of {len(cells)} cells were finished by an earlier session of this study and kept")
    failed = [(meta[k], o) for k, o in outcomes.items() if o.status != "finished"]
    if failed:
        shown = "; ".join(f"{t} {a} {m} seed {s}: {o.error}" for (t, a, s, m), o in failed[:3])
        raise StudyError(f"{len(failed)} of {len(cells)} cells did not finish ({shown}"
                         f"{'; ...' if len(failed) > 3 else ''}); the others are kept: resume the study "
                         f"(`workbench study resume {study_id}`) to try these again")
    rows = []
    for key, outcome in outcomes.items():
        target, arch, seed, spec = meta[key]
        s = outcome.value["summary"]
        name, own = _parse_method(spec)
        phi = (own or ours) if build_regularizer(name, config.method_options.get(name) or {}).needs_phi else None
        rows.append({"run_id": outcome.value["run_id"], "target": target, "arch": arch, "seed": int(seed),
                     "method": name, "phi": phi,
                     "test_accuracy": s["test_accuracy"], "test_nll": s["test_nll"], "test_ece": s["test_ece"],
                     "train_eval_accuracy": s.get("train_eval_accuracy"),
                     "generalization_gap": s.get("generalization_gap"),
                     "mc_samples": s["mc_samples"], "train_examples": s["train_examples"],
                     "test_examples": s["test_examples"], "train_seconds": s["train_seconds_last_session"]})
    frame = pd.DataFrame(rows)
    # every phi's verdict (ours, or a meta-train run named with @), labelled as the dashboard labels the runs
    frame.insert(6, "label", labels_for(store, frame["method"], frame["phi"]))
    frame.attrs["our_phi"] = ours
    frame.attrs["regime_warnings"] = [regime_warnings[c.key] for c in cells if c.key in regime_warnings]
    frame.attrs["workers"] = plan.describe()
    return frame


# ============================================================================================== the runner
@dataclass
class PreparedStudy:
    """A notebook with validated parameters, ready to execute."""

    path: Path
    name: str
    config_class: type[Config]
    config: Config
    profile: str

    @property
    def parameters(self) -> dict[str, Any]:
        return self.config.to_dict()


@dataclass
class StudyOutcome:
    notebook: str
    study_id: str
    status: str
    executed_notebook: Path
    seconds: float
    reason: Optional[str] = None


def prepare_studies(notebooks: Sequence[str | os.PathLike], profile: str | os.PathLike,
                    overrides: Mapping[str, Any] | None = None) -> list[PreparedStudy]:
    """Resolve the notebooks and validate each one's parameters (profile entry + overrides) against its config.

    An override ``key`` applies to every notebook whose config has that field (``notebook.key`` to one
    notebook only); a key no notebook knows is refused. Nothing is written.
    """
    if not notebooks:
        raise WorkbenchError("name at least one notebook, e.g. `workbench study run 02_transfer_study --profile demo`")
    paths = [resolve_notebook(n) for n in notebooks]
    names = [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise WorkbenchError(f"a notebook is named twice: {names}")
    classes = [notebook_config_class(p) for p in paths]
    per_notebook: dict[str, dict[str, Any]] = {n: {} for n in names}
    for key, value in (overrides or {}).items():
        prefix, dot, field_name = key.rpartition(".")
        if dot:
            target = next((n for n in names if n == prefix or n.split("_", 1)[0] == prefix), None)
            if target is None:
                raise WorkbenchError(f"parameter {key!r}: {prefix!r} is not one of the notebooks run ({', '.join(names)})")
            per_notebook[target][field_name] = value
            continue
        hits = [n for n, cls in zip(names, classes) if key in cls.field_names()]
        if not hits and len(names) == 1:
            hits = names  # its config refuses it below, with the same message a notebook shows
        if not hits:
            raise WorkbenchError(f"unknown parameter(s) [{key!r}]: not a field of any notebook's config here "
                                 f"({'; '.join(f'{n}: {c.__name__}' for n, c in zip(names, classes))})")
        for n in hits:
            per_notebook[n][key] = value
    profile_name = Path(str(profile)).stem if str(profile).endswith((".yaml", ".yml")) else str(profile)
    prepared = []
    for path, name, cls in zip(paths, names, classes):
        values = {**load_profile(profile, name), **per_notebook[name]}
        try:
            config = cls.from_dict(values)
        except WorkbenchError as exc:
            raise WorkbenchError(f"{name}: {exc}") from None
        prepared.append(PreparedStudy(path, name, cls, config, profile_name))
    return prepared


def _kernel_manager_class():
    """A kernel manager that starts ipykernel with this interpreter, whatever python the kernelspec names."""
    import zmq
    from jupyter_client.manager import AsyncKernelManager
    from traitlets import default

    class CurrentPythonKernelManager(AsyncKernelManager):
        @default("transport_encryption")
        def _encrypt_when_possible(self) -> str:  # CurveZMQ keys where the kernel supports them
            return "auto" if zmq.has("curve") else "disabled"

        def _kernel_supports_curve_encryption(self) -> bool:
            # an ipykernel spec runs this interpreter's ipykernel (below), whatever the kernelspec declares
            argv = list(getattr(self.kernel_spec, "argv", None) or [])
            return any("ipykernel" in part for part in argv[1:3]) or super()._kernel_supports_curve_encryption()

        def format_kernel_cmd(self, extra_arguments=None):
            cmd = super().format_kernel_cmd(extra_arguments)
            if any("ipykernel" in part for part in cmd[1:3]):
                cmd[0] = sys.executable
            return cmd

    return CurrentPythonKernelManager


@contextlib.contextmanager
def _environment(values: Mapping[str, Optional[str]]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_ANSI_MOVES = re.compile(r"\x1b\[[0-9;]*[ABCDEFGHJKSTfmnsu]")


def _screen_text(text: str) -> str:
    """What a terminal would show of streamed text: carriage returns overwrite, cursor moves dropped, cleared
    (blank) lines removed; so progress bars keep their last state instead of every update."""
    lines = []
    for line in _ANSI_MOVES.sub("", text).split("\n"):
        parts = line.split("\r")
        shown = next((p for p in reversed(parts) if p), "")
        if shown.strip() or not parts[:-1]:
            lines.append(shown.rstrip() if len(parts) > 1 else shown)
    return "\n".join(lines)


def tidy_outputs(nb: Any) -> Any:
    """Merge consecutive stream outputs of a cell (papermill keeps every message) and reduce them to their
    screen text (:func:`_screen_text`). Returns the notebook, changed in place."""
    for cell in nb.cells:
        if cell.get("cell_type") != "code":
            continue
        merged: list = []
        for out in cell.get("outputs", []):
            if (out.get("output_type") == "stream" and merged and merged[-1].get("output_type") == "stream"
                    and merged[-1].get("name") == out.get("name")):
                merged[-1]["text"] += out["text"]
            else:
                merged.append(out)
        for out in merged:
            if out.get("output_type") == "stream":
                out["text"] = _screen_text(out["text"])
        cell["outputs"] = [o for o in merged if o.get("output_type") != "stream" or o["text"].strip()]
    return nb


def _failure_reason(exc: BaseException) -> str:
    ename, evalue = getattr(exc, "ename", None), getattr(exc, "evalue", None)
    if ename:
        count = getattr(exc, "exec_count", None)
        where = f"cell [{count}]" if count else f"cell {getattr(exc, 'cell_index', '?')}"
        return f"{where} raised {ename}: {evalue}"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__


def execute_study(prepared: PreparedStudy, store: RunStore, stream: bool = True,
                  study: Optional[Study] = None) -> StudyOutcome:
    """Create the study record (or continue ``study``, reopened), execute the notebook with papermill, save it into
    the study folder, and mark the study finished or failed (the executed notebook keeps the failing cell's
    error)."""
    import nbformat
    import papermill

    parameters = prepared.parameters
    if study is None:
        study = store.create_study(os.path.relpath(prepared.path, REPO) if _inside_repo(prepared.path)
                                   else str(prepared.path), prepared.profile, parameters)
    final = study.executed_notebook_path
    partial = final.with_name(f".{final.stem}.partial.ipynb")
    env = {STUDY_ENV: study.study_id, ARTIFACTS_ENV: str(store.root),
           PROGRESS_ENV: "text" if stream else "off", "TQDM_MININTERVAL": "1" if stream else None,
           "TQDM_DISABLE": None if stream else "1"}
    started = time.perf_counter()
    print(f"== {prepared.name}: study {study.study_id} (profile {prepared.profile})", file=sys.stderr, flush=True)
    reason = None
    try:
        with _environment(env):
            papermill.execute_notebook(
                str(prepared.path), str(partial), parameters=parameters, cwd=str(prepared.path.parent),
                progress_bar=False, log_output=False, stdout_file=sys.stdout if stream else None,
                stderr_file=sys.stderr if stream else None, start_timeout=KERNEL_START_TIMEOUT,
                kernel_manager_class=_kernel_manager_class(), request_save_on_cell_execute=True)
    except KeyboardInterrupt:
        reason = "interrupted (Ctrl-C)"
        raise
    except Exception as exc:  # PapermillExecutionError: a cell failed; anything else: the kernel or papermill
        reason = _failure_reason(exc)
    finally:
        if not partial.is_file():  # the kernel never ran a cell: keep the notebook with the reason on top
            nb = nbformat.read(str(prepared.path), as_version=4)
            nb.cells.insert(0, nbformat.v4.new_markdown_cell(f"**This study failed before any cell ran:** "
                                                             f"{reason or 'interrupted'}"))
            nbformat.write(nb, str(partial))
        else:
            with contextlib.suppress(Exception):  # tidying is cosmetic; never lose the notebook over it
                nbformat.write(tidy_outputs(nbformat.read(str(partial), as_version=4)), str(partial))
        os.replace(partial, final)
        if reason is None:
            study.mark_finished()
        else:
            study.mark_failed(reason)
    seconds = time.perf_counter() - started
    status = "failed" if reason else "finished"
    print(f"== {prepared.name}: study {study.study_id} {status} in {seconds:.0f} s; executed notebook {final}"
          + (f"\n   {reason}" if reason else ""), file=sys.stderr, flush=True)
    return StudyOutcome(prepared.name, study.study_id, status, final, seconds, reason)


def _inside_repo(path: Path) -> bool:
    try:
        path.resolve().relative_to(REPO)
        return True
    except ValueError:
        return False


def run_studies(notebooks: Sequence[str | os.PathLike], profile: str | os.PathLike,
                overrides: Mapping[str, Any] | None = None, artifacts: str | os.PathLike | None = None,
                stream: bool = True) -> list[StudyOutcome]:
    """Validate all, then execute the notebooks one after another (each its own study) until one fails."""
    prepared = prepare_studies(notebooks, profile, overrides)
    roots = {p.name: p.config.artifacts_root for p in prepared if getattr(p.config, "artifacts_root", None)}
    root = default_root(artifacts if artifacts is not None else next(iter(roots.values()), None))
    for name, value in roots.items():
        if default_root(value) != root:
            raise WorkbenchError(f"{name}: artifacts_root={value} differs from the artifacts root {root} of this "
                                 "command; drop the parameter or pass the same --artifacts")
    store = RunStore(root)
    outcomes = []
    for item in prepared:
        outcome = execute_study(item, store, stream=stream)
        outcomes.append(outcome)
        if outcome.status != "finished":
            break
    return outcomes


def resume_study(study_id: str, artifacts: str | os.PathLike | None = None,
                 execution: Mapping[str, Any] | None = None, stream: bool = True) -> StudyOutcome:
    """Run an interrupted or failed study's notebook again, in the same study and with the same parameters: the
    grid cells it finished are kept, the others resumed or started again. ``execution`` may change where cells
    run (workers, executor, ray_address, retries), nothing else."""
    from .fanout import EXECUTION_FIELDS

    store = RunStore(artifacts)
    study = store.open_study(study_id)
    path = Path(study.notebook)
    if not path.is_absolute():
        path = REPO / path
    if not path.is_file():
        raise WorkbenchError(f"study {study_id} ran {study.notebook}, which is not here any more; it cannot be resumed")
    cls = notebook_config_class(path)
    changes = dict(execution or {})
    wrong = sorted(set(changes) - set(EXECUTION_FIELDS))
    if wrong:
        raise WorkbenchError(f"a resumed study keeps its parameters; only {', '.join(EXECUTION_FIELDS)} may change "
                             f"(got {', '.join(wrong)})")
    unknown = sorted(k for k in changes if k not in cls.field_names())
    if unknown:
        raise WorkbenchError(f"{path.stem} has no parameter {', '.join(unknown)}: its cells do not fan out")
    try:
        config = cls.from_dict({**study.parameters, **changes})
    except WorkbenchError as exc:
        raise WorkbenchError(f"study {study_id}: {exc}") from None
    study.reopen()
    prepared = PreparedStudy(path, path.stem, cls, config, study.profile)
    return execute_study(prepared, store, stream=stream, study=study)


# ================================================================================================== the CLI
def _parse_value(raw: str) -> Any:
    try:
        return yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        return raw


def _execution_flags(args: argparse.Namespace) -> dict[str, Any]:
    flags = {"workers": args.workers, "executor": args.executor, "ray_address": args.address,
             "retries": args.retries}
    return {key: value for key, value in flags.items() if value is not None}


def _cli_run(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {}
    for key, raw in args.parameter or []:
        overrides[key] = _parse_value(raw)
    execution = _execution_flags(args)
    if execution:
        paths = [resolve_notebook(n) for n in args.notebooks]
        fanning = [p.stem for p in paths if set(execution) <= set(notebook_config_class(p).field_names())]
        if not fanning:
            raise WorkbenchError(f"--{next(iter(execution)).replace('ray_address', 'address')} applies to the "
                                 f"notebooks whose cells fan out (01_meta_train, 02_transfer_study), none of which "
                                 f"is run here")
        for name in fanning:
            for key, value in execution.items():
                overrides.setdefault(f"{name}.{key}", value)
    outcomes = run_studies(args.notebooks, args.profile, overrides, artifacts=args.artifacts, stream=not args.quiet)
    failed = [o for o in outcomes if o.status != "finished"]
    skipped = len(args.notebooks) - len(outcomes)
    for o in outcomes:
        print(f"{o.status:<9} {o.study_id}  {o.executed_notebook}")
    if failed:
        print(f"error: study {failed[0].study_id} ({failed[0].notebook}) failed: {failed[0].reason}"
              + (f"; {skipped} later notebook(s) not run" if skipped else ""), file=sys.stderr)
        return 1
    return 0


def _cli_resume(args: argparse.Namespace) -> int:
    outcome = resume_study(args.study, args.artifacts, _execution_flags(args), stream=not args.quiet)
    print(f"{outcome.status:<9} {outcome.study_id}  {outcome.executed_notebook}")
    if outcome.status != "finished":
        print(f"error: study {outcome.study_id} ({outcome.notebook}) failed: {outcome.reason}", file=sys.stderr)
        return 1
    return 0


def _add_execution_flags(parser: argparse.ArgumentParser) -> None:
    from .fanout import EXECUTORS, RAY_ADDRESS_ENV

    group = parser.add_argument_group("fan-out (01_meta_train's num_runs, 02_transfer_study's grid)")
    group.add_argument("--workers", type=int, metavar="N", help="cells at once (default: one per core, one thread "
                                                                "each; one per GPU); 1: one after another")
    group.add_argument("--executor", choices=EXECUTORS, help="local worker processes (default) or a Ray cluster")
    group.add_argument("--address", metavar="HOST:PORT", help=f"the Ray cluster (default ${RAY_ADDRESS_ENV}, else a "
                                                              "local Ray instance)")
    group.add_argument("--retries", type=int, metavar="N", help="further attempts for a failed cell (default 1)")


def _cli_list(args: argparse.Namespace) -> int:
    store = RunStore(args.artifacts)
    records = store.list_studies()
    if args.json:
        print(json.dumps([to_jsonable(r.row(store.root)) for r in records], indent=2))
        return 0
    if not records:
        print(f"no studies under {store.root}; run one with `workbench study run 02_transfer_study --profile smoke`")
        return 0
    print(f"{'study id':<52} {'status':<9} {'profile':<11} {'runs':>4}  created              notebook / reason")
    for r in records:
        created = (r.created or "")[:19].replace("T", " ")
        tail = r.notebook or ""
        if r.status in ("failed", "corrupt", "stale") and r.reason:
            tail = f"{tail}  ({r.reason[:100]})"
        print(f"{r.study_id:<52} {r.status:<9} {str(r.profile or '-'):<11} {len(r.run_ids):>4}  {created:<20} {tail}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``workbench study run``, ``workbench study resume`` and ``workbench study list``."""
    from .cli import add_artifacts_flag

    parser = subparsers.add_parser(
        "study", help="run the study notebooks headless (papermill) and list studies",
        description="Execute the notebooks of notebooks/ with a parameter profile; each notebook becomes a study "
                    "in <artifacts>/studies/<study id>/ with its executed notebook and the runs it made.")
    sub = parser.add_subparsers(dest="study_command", metavar="ACTION")
    run = sub.add_parser(
        "run", help="execute notebooks with a profile",
        description="Validate every notebook's parameters, then execute the notebooks one after another, each as "
                    "its own study; stops at the first failure (exit 1). A bad parameter exits 2 before anything "
                    f"runs. Notebooks: {', '.join(available_notebooks()) or 'none found'} (a number such as 02 "
                    f"works). Profiles: {', '.join(available_profiles()) or 'none found'} (or a YAML file).")
    run.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="notebook path, name or number")
    run.add_argument("--profile", required=True, help="profile name (notebooks/profiles/NAME.yaml) or YAML file")
    run.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
                     help="override a parameter (VALUE is YAML: 10, 1e-3, [a, b], null); KEY or NOTEBOOK.KEY")
    add_artifacts_flag(run)
    run.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output and progress")
    _add_execution_flags(run)
    run.set_defaults(func=_cli_run)
    resume = sub.add_parser(
        "resume", help="continue an interrupted or failed study",
        description="Execute a study's notebook again in the same study, with its parameters: grid cells it "
                    "finished are kept, the others resume from their checkpoints or start again. Only the fan-out "
                    "settings may change.")
    resume.add_argument("study", metavar="STUDY", help="the study id (`workbench study list`)")
    add_artifacts_flag(resume)
    resume.add_argument("--quiet", action="store_true", help="do not stream the notebook's output and progress")
    _add_execution_flags(resume)
    resume.set_defaults(func=_cli_resume)
    listing = sub.add_parser("list", help="list the studies of an artifacts root")
    add_artifacts_flag(listing)
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
    listing.set_defaults(func=_cli_list)
    parser.set_defaults(func=lambda args: (parser.print_help(), 1)[1])


__all__ = [
    "CalibrationStudyConfig", "EXPLORE_STATISTICS", "ExploreConfig", "MetaHistory", "ParameterError",
    "PreparedStudy", "ScaleData", "ScalesStudyConfig",
    "StudyError", "StudyOutcome", "StudyRunStore", "StudySession", "TransferStudyConfig", "available_notebooks",
    "describe_meta",
    "available_profiles", "execute_study", "find_study", "grid_cells", "latest_phi_run", "limit_test",
    "load_profile", "meta_history", "method_label", "paired_differences", "regime_table", "notebook_config", "notebook_config_class", "open_session",
    "parameters_source", "prepare_studies", "read_profile", "register_cli", "reliability_groups",
    "resolve_notebook", "resolve_study_phi", "resume_study", "transfer_cell", "cell_run_id", "robustness_table", "run_studies", "run_transfer_grid", "save_report",
    "scale_data", "study_runs", "summarize", "tidy_outputs", "wide",
]
