"""The study notebooks' typed configs (:class:`TransferStudyConfig`, :class:`CalibrationStudyConfig`,
:class:`ScalesStudyConfig`, :class:`ExploreConfig`), where notebooks and profiles are, and how a notebook's
parameters are validated."""
from __future__ import annotations

import importlib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import yaml

from ..config import Config, require
from ..errors import ParameterError, WorkbenchError
from ..results import LATEST
from ..fanout import FanOutSettings
from ..transfer import TransferConfig, TransferRecipe


STUDY_ENV = "WORKBENCH_STUDY_ID"


ARTIFACTS_ENV = "WORKBENCH_ARTIFACTS"


PROGRESS_ENV = "WORKBENCH_PROGRESS"  # "text": plain tqdm bars (the runner streams them to its console)


REPO = Path(__file__).resolve().parents[2]


NOTEBOOKS_DIR = REPO / "notebooks"


PROFILES_DIR = NOTEBOOKS_DIR / "profiles"


REPORT_KIND = "study_report"




OFFICIAL = "official"




INTERACTIVE_PROFILE = "interactive"


KERNEL_START_TIMEOUT = 300  # seconds; a loaded 2-core machine needs more than papermill's default 60


def _parse_method(spec: str) -> tuple[str, Optional[str]]:
    """``"metaperturb@official"`` -> ``("metaperturb", "official")``; ``"base"`` -> ``("base", None)``."""
    name, _, phi = str(spec).partition("@")
    return name.strip(), (phi.strip() or None) if _ else None


@dataclass
class TransferStudyConfig(TransferRecipe, FanOutSettings):
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
    workers, executor, ray_address, retries: where the cells run (:class:`~workbench.fanout.FanOutSettings`);
        a resumed study may change them.
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

    def validate(self) -> None:
        from ..regularizers import build_regularizer

        super().validate()  # the recipe's checks, then the acceleration and fan-out settings'
        require(self.regime_check in REGIME_CHECKS,
                f"regime_check must be one of {', '.join(REGIME_CHECKS)}, got {self.regime_check!r}")

        for name in ("targets", "archs", "methods", "seeds"):
            values = getattr(self, name)
            require(len(values) > 0, f"{name} must list at least one entry")
            require(len(set(map(str, values))) == len(values), f"{name} lists an entry twice: {values}")
        require(all(s >= 0 for s in self.seeds), f"seeds must be non-negative integers, got {self.seeds}")
        from ..data import SOURCES, TORCHVISION

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
        from ..models import build

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
    """``module:Class`` for a notebook's metadata: the package that exports the class (``workbench.study``, not
    the module inside it that defines it), so the notebooks do not change when a package is reorganised."""
    module = cls.__module__
    while "." in module:
        parent = module.rsplit(".", 1)[0]
        if getattr(importlib.import_module(parent), cls.__qualname__, None) is not cls or parent == "workbench":
            break
        module = parent
    return f"{module}:{cls.__qualname__}"


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


REGIME_CHECKS = ("warn", "stop", "off")
