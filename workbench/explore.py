"""Look inside phi: the logic behind the controls of ``05_explore_phi`` (the reading notebooks' filters are in
:mod:`workbench.filters`). Each function takes a selection and returns a plotly figure or a table;
:mod:`workbench.controls` shows widgets and re-renders, and a notebook cell only connects the two.

The phi explorer
----------------
:meth:`PhiExplorer.explore` runs one batch through a network with phi attached and records what one site does, for
one phi and, beside it, a second: the site's input feature map h (after the BatchNorm the site applies, where attach
fused one), the noise draw eps, the multiplier ``1 + k (s z - 1)`` exactly as the site applied it (``s z`` at k = 1),
the perturbed map ``h * multiplier`` (before the layer's ReLU and pool), the per-channel scale s (the site's
``last_scale``) and the statistics it came from. Chosen so that the two phis differ only by their function:

- only the chosen site perturbs; the others are switched off, so its input is the network's own feature map;
- the site uses the batch's statistics (training mode, as in meta-training and in a target network's training
  step); a fresh network runs in training mode too (batch-statistics BatchNorm, like ``phi_diagnostics.probe_phi``),
  a trained one in evaluation mode (its running BatchNorm statistics);
- eps is drawn from ``seed`` and handed to the site, so both phis get the same noise;
- the site runs phi's plain-autograd path (``fused = False``), which keeps the multiplier map (the fused CPU kernel
  keeps only its mean and std); both compute the same function (``tests/test_perturb.py``).

Everything runs on the CPU: one forward pass of one batch per phi.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from . import plots
from .artifacts import RunStore
from .errors import WorkbenchError
from .perturb import MetaPerturb
from .results import CONTROL_METHOD, labels_for, method_label, phi_learned, short_id
from .study import EXPLORE_STATISTICS, LATEST, OFFICIAL, ExploreConfig, StudyError, latest_phi_run

UNTRAINED = "untrained"
ARCHS = ("resnet20", "resnet32", "conv4", "conv6", "vgg9", "wrn16_4")  # the architecture control's choices
FRESH = None  # the network control's value for a fresh, seeded network
_KERNELS = 4


# ============================================================================================== the explorer
@dataclasses.dataclass
class SiteView:
    """What one phi did at one site for one batch (CPU tensors; maps are (B, C, H, W))."""

    label: str                 # the phi's row name (labels.method_label)
    spec: str                  # the phi as selected (official, a run id, untrained:<run id>, a file)
    h: torch.Tensor            # the site's input feature map (after the BatchNorm it applies, where it applies one)
    eps: torch.Tensor          # the standard-normal draw
    multiplier: torch.Tensor   # 1 + k (s z - 1), z = softplus(mu + eps): exactly what the site multiplied h by
    out: torch.Tensor          # h * multiplier, before the layer's ReLU and pool
    site_output: torch.Tensor  # what the site returned (with the ReLU / pool it stands in for)
    scale: torch.Tensor        # (C,) the site's last_scale for this batch
    stats: pd.DataFrame        # per channel: channel, scale, m1..m4, v1..v4, mean/variance/size terms, logit
    relu: bool                 # the site stands in for the layer's ReLU (and pool)
    pool: bool
    channel_norm: float        # the site's normalisers of C and H in the scale's size features
    spatial_norm: float

    @property
    def multiplier_stats(self) -> dict[str, float]:
        m = self.multiplier.double()
        return {"mean": float(m.mean()), "std": float(m.std())}


@dataclasses.dataclass
class Exploration:
    """One selection's result: the batch, the network, the site, and one :class:`SiteView` per phi."""

    config: ExploreConfig
    network: str               # what the features come from, in words
    arch: str
    dataset: str
    site_names: list[str]
    images: torch.Tensor       # (B, C, H, W) uint8, as fed (resized, channels converted)
    labels: list[str]          # class names of the batch
    views: list[SiteView]

    @property
    def site(self) -> str:
        return f"{self.config.site}: {self.site_names[self.config.site]}"

    @property
    def channels(self) -> int:
        return int(self.views[0].h.shape[1])


class PhiExplorer:
    """Loads phis, networks and batches (cached) and computes :class:`Exploration` results for selections."""

    def __init__(self, store: RunStore | None = None, data_root: str | None = None):
        self.store = store if store is not None else RunStore()
        self.data_root = data_root
        self._datasets: dict[str, Any] = {}
        self._stats: dict[tuple[str, int], tuple[list[float], list[float]]] = {}
        self._phis: dict[str, tuple[MetaPerturb, str]] = {}
        self._networks: dict[str, tuple[dict[str, Any], str]] = {}

    # ------------------------------------------------------------------------------------------------ choices
    def phi_choices(self, *keep: Optional[str], none: bool = False) -> list[tuple[str, Optional[str]]]:
        """(label, spec) of every phi there is to pick: the authors', each finished meta-training result's and its
        untrained control, the control of the first phi (``untrained``), and the specs in ``keep`` (e.g. a file
        given as a parameter). ``none``: also "none" (no second phi)."""
        runs = [r for r in self.store.list_runs(kind="meta_select") if r.status == "finished"]
        runs += [r for r in self.store.list_runs(kind="meta_train")
                 if r.status == "finished" and "parent" not in r.tags]
        runs = sorted((r for r in runs if (r.path / "phi.pt").is_file()), key=lambda r: r.run_id, reverse=True)
        verdicts = phi_learned(self.store, [r.run_id for r in runs])
        out: list[tuple[str, Optional[str]]] = [("none", None)] if none else []
        out.append((method_label("metaperturb", OFFICIAL), OFFICIAL))
        out.append((f"{method_label(CONTROL_METHOD)} of the first phi", UNTRAINED))
        for r in runs:
            out.append((method_label("metaperturb", r.run_id, verdicts.get(r.run_id)), r.run_id))
            out.append((f"{method_label(CONTROL_METHOD)}: {short_id(r.run_id)}", f"{UNTRAINED}:{r.run_id}"))
        newest = latest_phi_run(self.store)
        if newest is not None:
            out.append((f"latest meta-training run ({short_id(newest.run_id)})", LATEST))
        for spec in keep:
            if spec is not None and spec not in [v for _, v in out]:
                out.append((self.phi_label(spec), spec))
        return out

    def network_choices(self, *keep: Optional[str]) -> list[tuple[str, Optional[str]]]:
        """("fresh network", None), then (description, run id) of every finished run with a trained network."""
        records = [r for kind in ("transfer", "source") for r in self.store.list_runs(kind=kind)
                   if r.status == "finished" and (r.path / "checkpoints" / "model.pt").is_file()]
        records.sort(key=lambda r: r.run_id, reverse=True)
        names = labels_for(self.store, [r.tags.get("method") for r in records], [r.tags.get("phi") for r in records])
        out: list[tuple[str, Optional[str]]] = [("fresh network (seeded)", FRESH)]
        out += [(f"{r.tags.get('target')} / {r.tags.get('arch')} / {name} / seed {r.tags.get('seed')} "
                 f"({short_id(r.run_id)})", r.run_id) for r, name in zip(records, names)]
        if records:
            out.append((f"latest transfer run ({short_id(records[0].run_id)})", LATEST))
        for spec in keep:
            if spec is not None and spec not in [v for _, v in out]:
                out.append((Path(str(spec)).name, spec))
        return out

    def dataset_choices(self, *keep: Optional[str]) -> list[str]:
        from .data import available_datasets

        names = [row["name"] for row in available_datasets(self.data_root) if row["available"]]
        return names + [k for k in keep if k is not None and k not in names]

    def batch_count(self, dataset: str, split: str, batch_size: int) -> int:
        ds = self._dataset(dataset)
        return max(1, len(ds.y_train if split == "train" else ds.y_test) // batch_size)

    # ---------------------------------------------------------------------------------------------- loading
    def phi_label(self, spec: str) -> str:
        spec = str(spec)
        if spec == UNTRAINED or spec.startswith(f"{UNTRAINED}:"):
            base = spec.partition(":")[2]
            if not base or base in (OFFICIAL, LATEST):
                return method_label(CONTROL_METHOD)
            return f"{method_label(CONTROL_METHOD)}: {short_id(self._phi_name(base))}"
        if spec == LATEST:
            record = latest_phi_run(self.store)
            spec = record.run_id if record is not None else spec
        if spec == OFFICIAL:
            return method_label("metaperturb", OFFICIAL)
        if (self.store.runs_dir / spec / "run.json").is_file():
            return method_label("metaperturb", spec, phi_learned(self.store, [spec]).get(spec))
        path = Path(spec).expanduser()
        run_dir = path if path.is_dir() else path.parent
        if (run_dir / "run.json").is_file():  # a run's phi.pt (or its folder): named and judged like the run
            store = RunStore(run_dir.parent.parent)
            return method_label("metaperturb", run_dir.name, phi_learned(store, [run_dir.name]).get(run_dir.name))
        return method_label("metaperturb", path.stem)

    def _phi_name(self, spec: str) -> str:
        """A run id as it is; a run's phi.pt (or folder) by the run's id; another file by its stem."""
        if (self.store.runs_dir / spec).is_dir():
            return spec
        path = Path(spec).expanduser()
        run_dir = path if path.is_dir() else path.parent
        return run_dir.name if (run_dir / "run.json").is_file() else path.stem

    def load_phi(self, spec: str, first: Optional[str] = None) -> tuple[MetaPerturb, str]:
        """(a frozen copy of phi, its label) for a spec (see :class:`ExploreConfig`); ``untrained`` is the
        untrained control of ``first``."""
        from .transfer import resolve_phi

        spec = str(spec).strip()
        if spec == UNTRAINED:
            if first is None:
                raise WorkbenchError("phi 'untrained' is the untrained control of the first phi; as the first phi, "
                                     "name its run: untrained:<run id> (or untrained:official)")
            spec = f"{UNTRAINED}:{first}"
        key = spec
        if key not in self._phis:
            initial = spec.startswith(f"{UNTRAINED}:")
            target = spec.partition(":")[2] if initial else spec
            if target == LATEST:
                record = latest_phi_run(self.store)
                if record is None:
                    raise StudyError(f"phi '{spec}': no finished meta-training run under {self.store.root}; use "
                                     "official, a run id or a phi file")
                target = record.run_id
            phi, _, _ = resolve_phi(target, self.store, initial=initial)
            self._phis[key] = (phi, self.phi_label(f"{UNTRAINED}:{target}" if initial else target))
        phi, label = self._phis[key]
        copy = MetaPerturb()
        copy.load_state_dict({k: v.detach().cpu() for k, v in phi.state_dict().items()})
        return copy.requires_grad_(False), label

    def _network(self, spec: str) -> tuple[dict[str, Any], str]:
        from .transfer import load_network_payload

        if spec == LATEST:
            choices = [v for _, v in self.network_choices() if v not in (FRESH, LATEST)]
            if not choices:
                raise StudyError(f"network 'latest': no finished transfer run with a trained network under "
                                 f"{self.store.root}; run 02_transfer_study, or use a fresh network (null)")
            spec = choices[0]
        if spec not in self._networks:
            payload, origin = load_network_payload(spec, self.store)
            self._networks[spec] = (payload, origin)
        return self._networks[spec]

    def _dataset(self, name: str):
        from .data import load_dataset

        if name not in self._datasets:
            self._datasets[name] = load_dataset(name, root=self.data_root)
        return self._datasets[name]

    def _model(self, config: ExploreConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
        """The network (a fresh copy each call) and how to feed it: arch, classes, channels, size, mean, std."""
        from .data.views import channel_stats
        from .models import build

        if config.network is None:
            dataset = config.dataset or "cifar10"
            ds = self._dataset(dataset)
            key = (dataset, ds.channels)
            if key not in self._stats:
                self._stats[key] = channel_stats(ds.x_train)
            mean, std = self._stats[key]
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)
                model = build(config.arch, ds.num_classes, in_channels=ds.channels, image_size=config.image_size)
            return model, {"arch": config.arch, "channels": ds.channels, "image_size": config.image_size,
                           "mean": mean, "std": std, "dataset": dataset, "trained": False,
                           "network": f"a fresh {config.arch} (seed {config.seed})"}
        payload, origin = self._network(config.network)
        model = build(payload["arch"], int(payload["num_classes"]), in_channels=int(payload["in_channels"]),
                      image_size=int(payload["image_size"]))
        own = model.state_dict()
        saved = payload["state_dict"]
        missing = [k for k in own if k not in saved or tuple(saved[k].shape) != tuple(own[k].shape)]
        if missing:
            raise WorkbenchError(f"network {origin}: its saved weights do not fit a plain {payload['arch']} "
                                 f"(missing or mis-shaped: {missing[:3]})")
        model.load_state_dict({k: saved[k] for k in own})
        saved_config = payload.get("config") or {}
        target = saved_config.get("target")
        is_run = (self.store.runs_dir / origin).is_dir() or Path(str(config.network)).expanduser().is_dir()
        name = f"run {short_id(origin)}" if is_run else origin
        seed = saved_config.get("seed")
        trained = ", ".join(str(v) for v in (payload.get("method"), target, None if seed is None else f"seed {seed}")
                            if v is not None)
        return model, {"arch": str(payload["arch"]), "channels": int(payload["in_channels"]),
                       "image_size": int(payload["image_size"]), "mean": list(payload["mean"]),
                       "std": list(payload["std"]), "dataset": config.dataset or target or "cifar10", "trained": True,
                       "network": f"the trained {payload['arch']} of {name}" + (f" ({trained})" if trained else "")}

    def _batch(self, dataset: str, split: str, config: ExploreConfig, channels: int, image_size: int):
        from .data.views import convert_channels, resize_images

        ds = self._dataset(dataset)
        x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
        start = config.batch * config.batch_size
        if start + config.batch_size > len(y):
            raise WorkbenchError(f"batch {config.batch} of {config.batch_size} images is past the end of {dataset}'s "
                                 f"{split} split ({len(y)} images: batches 0 .. {len(y) // config.batch_size - 1})")
        images = convert_channels(resize_images(x[start:start + config.batch_size], image_size), channels)
        return images, [ds.classes[int(c)] for c in y[start:start + config.batch_size]]

    # ------------------------------------------------------------------------------------------------ explore
    def explore(self, config: ExploreConfig | Mapping[str, Any] | None = None, **changes: Any) -> Exploration:
        """What phi (and ``compare``) do at ``config.site`` for the selected batch (see the module docstring)."""
        if not isinstance(config, ExploreConfig):
            config = ExploreConfig.from_dict(dict(config or {}))
        if changes:
            config = config.replace(**changes)
        from .data import Augment

        first, label = self.load_phi(config.phi)
        phis = [(config.phi, first, label)]
        if config.compare is not None:
            base = config.phi.partition(":")[2] if config.phi.startswith(f"{UNTRAINED}:") else config.phi
            second, second_label = self.load_phi(config.compare, first=base)
            phis.append((config.compare, second, second_label))
        model, feed = self._model(config)
        images, labels = self._batch(feed["dataset"], config.split, config, feed["channels"], feed["image_size"])
        normalize = Augment(feed["image_size"], padding=0, flip=False, mean=feed["mean"], std=feed["std"])
        x = normalize.normalize(images)
        views, names = [], []
        for i, (spec, phi, name) in enumerate(phis):
            if i:  # a fresh copy: a training-mode forward changes the BatchNorm statistics
                model, _ = self._model(config)
            view, names = site_view(model, phi, x, config.site, noise_coeff=config.noise_coeff, seed=config.seed,
                                    train=not feed["trained"], image_size=feed["image_size"])
            views.append(dataclasses.replace(view, label=name, spec=spec))
        bad = [c for c in config.channels if c >= views[0].h.shape[1]]
        if bad:
            raise WorkbenchError(f"channels {bad}: site {config.site} ({names[config.site]}) has "
                                 f"{views[0].h.shape[1]} channels (0 .. {views[0].h.shape[1] - 1})")
        return Exploration(config, feed["network"], feed["arch"], feed["dataset"], names, images, labels, views)


@torch.no_grad()
def site_view(model: torch.nn.Module, phi: MetaPerturb, x: torch.Tensor, site: int, *, noise_coeff: float = 1.0,
              seed: int = 0, train: bool = True, image_size: int | None = None) -> tuple[SiteView, list[str]]:
    """Attach ``phi`` to ``model``, run the normalised batch ``x`` with only site ``site`` perturbing (batch
    statistics, noise coefficient ``noise_coeff``, no clip, eps drawn from ``seed``), detach, and return what the
    site did with the names of all sites. ``train``: run the rest of the network in training mode."""
    from ._fused import batch_norm as apply_batch_norm
    from .attach import attach

    handle = attach(model, phi, image_size=image_size or int(x.shape[-1]))
    captured: dict[str, Any] = {}
    try:
        names = list(handle.site_names)
        if not 0 <= site < len(handle.sites):
            raise WorkbenchError(f"site {site}: this {type(model).__name__} has {len(names)} perturbation sites "
                                 f"(0 .. {len(names) - 1})")
        chosen = handle.sites[site]
        handle.set_active(False)
        handle.set_noise_coeff(noise_coeff)
        handle.set_clip(None)
        model.train(train)
        chosen.active, chosen.fused, chosen.record_stats = True, False, True
        chosen.train(True)

        def before(module, args, kwargs):
            h = args[0]
            generator = torch.Generator(device="cpu").manual_seed(int(seed))
            eps = torch.randn(tuple(h.shape), generator=generator, dtype=h.dtype).to(h.device)
            captured.update(h=h, eps=eps, relu=bool(kwargs.get("relu", False)), pool=bool(kwargs.get("pool", False)),
                            batch_norm=kwargs.get("batch_norm"))
            return args, {**kwargs, "eps": eps}

        def after(module, args, kwargs, output):
            captured["output"] = output

        hooks = [chosen.register_forward_pre_hook(before, with_kwargs=True),
                 chosen.register_forward_hook(after, with_kwargs=True)]
        try:
            model(x)
        finally:
            for hook in hooks:
                hook.remove()
        h = captured["h"]
        if captured["batch_norm"] is not None:  # the site applied this BatchNorm to its input: h is its output
            h = apply_batch_norm(captured["batch_norm"], h)
        h = h.contiguous().float().cpu()
        multiplier = chosen._last_multiplier.contiguous().float().cpu()
        scale = chosen.last_scale.float().cpu()
        stats = channel_statistics(phi, h, chosen.channel_norm, chosen.spatial_norm, scale)
        view = SiteView("", "", h, captured["eps"].float().cpu(), multiplier, h * multiplier,
                        captured["output"].contiguous().float().cpu(), scale, stats, captured["relu"],
                        captured["pool"], chosen.channel_norm, chosen.spatial_norm)
    finally:
        handle.remove()
    return view, names


def channel_statistics(phi: MetaPerturb, h: torch.Tensor, channel_norm: float, spatial_norm: float,
                       scale: torch.Tensor | None = None) -> pd.DataFrame:
    """Per channel of the map ``h`` (B, C, H, W): the batch mean m_j and unbiased variance v_j of the four pooled
    kernel responses, the terms of the logit ``w . [m, v, C / channel_norm, H / spatial_norm]`` and the scale
    ``sigmoid(logit)`` (``scale``: the one the site computed, reported instead when given)."""
    features = phi.scale_features(h.float())  # (B, C, 4)
    m, v = features.mean(0), features.var(0)
    w = phi.scale_fc.weight[0].detach().float()
    c, height = h.shape[1], h.shape[2]
    mean_term, var_term = m @ w[:_KERNELS], v @ w[_KERNELS:2 * _KERNELS]
    size_term = float(w[2 * _KERNELS] * (c / channel_norm) + w[2 * _KERNELS + 1] * (height / spatial_norm))
    logit = mean_term + var_term + size_term
    frame = pd.DataFrame({"channel": np.arange(c),
                          "scale": (scale if scale is not None else torch.sigmoid(logit)).double().numpy()})
    for j in range(_KERNELS):
        frame[f"m{j + 1}"] = m[:, j].double().numpy()
    for j in range(_KERNELS):
        frame[f"v{j + 1}"] = v[:, j].double().numpy()
    frame["mean term"] = mean_term.double().numpy()
    frame["variance term"] = var_term.double().numpy()
    frame["size term"] = size_term
    frame["logit"] = logit.double().numpy()
    return frame


def channel_table(exploration: Exploration) -> pd.DataFrame:
    """The per-channel statistics of every phi of an exploration, one row per (phi, channel)."""
    return pd.concat([view.stats.assign(phi=view.label) for view in exploration.views], ignore_index=True)[
        ["phi", *exploration.views[0].stats.columns]]


# ============================================================================================ explorer figures
def _short(index: int) -> str:
    return "AB"[index] if index < 2 else str(index)


def _title(what: str, exploration: Exploration) -> str:
    """``what`` at the site, then a line with the network, the batch, k and the phis."""
    c = exploration.config
    phis = "; ".join(f"{_short(i)} = {v.label}" for i, v in enumerate(exploration.views))
    return (f"{what} · site {exploration.site}<br><sup>{exploration.network} · {exploration.dataset} {c.split} "
            f"batch {c.batch} · k = {c.noise_coeff:g} · {phis}</sup>")


def feature_maps(exploration: Exploration) -> go.Figure:
    """For the selected image and channels: the image, the site's input map h, and per phi the multiplier map
    (``s z`` at k = 1) and the perturbed map ``h * multiplier``; maps on shared colour scales (features, multiplier)."""
    c = exploration.config
    channels = list(c.channels)
    k = c.noise_coeff
    mult_name = "s·z" if k == 1 else "1 + k(s·z − 1)"
    columns = ["image", "input h"]
    for i, _ in enumerate(exploration.views):
        columns += [f"{_short(i)}: {mult_name}", f"{_short(i)}: perturbed h·{mult_name}"]
    fig = make_subplots(rows=len(channels), cols=len(columns), column_titles=columns,
                        row_titles=[f"channel {ch}" for ch in channels], horizontal_spacing=0.015,
                        vertical_spacing=0.03)
    image = exploration.images[c.image].permute(1, 2, 0).numpy()
    if image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    fig.add_trace(go.Image(z=image, hovertemplate=f"{exploration.labels[c.image]}<extra></extra>"), row=1, col=1)
    views = exploration.views
    maps = [views[0].h] + [t for v in views for t in (v.out,)]
    limit = float(max(t[c.image, channels].abs().max() for t in maps)) or 1.0
    mults = torch.stack([v.multiplier[c.image, channels] for v in views])
    low, high = float(mults.min()), float(mults.max())
    for row, ch in enumerate(channels, start=1):
        def heat(z: torch.Tensor, axis: str, col: int, what: str) -> None:
            fig.add_trace(go.Heatmap(z=z.numpy(), coloraxis=axis, hovertemplate=f"{what}, channel {ch}<br>"
                                     "row %{y}, column %{x}: %{z:.4f}<extra></extra>"), row=row, col=col)

        heat(views[0].h[c.image, ch], "coloraxis", 2, "input h")
        for i, view in enumerate(views):
            heat(view.multiplier[c.image, ch], "coloraxis2", 3 + 2 * i, f"{_short(i)}: multiplier")
            heat(view.out[c.image, ch], "coloraxis", 4 + 2 * i, f"{_short(i)}: perturbed")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False, autorange="reversed")
    fig.update_layout(coloraxis=dict(colorscale="RdBu_r", cmin=-limit, cmax=limit,
                                     colorbar=dict(title="h", x=1.0, len=0.45, y=0.78)),
                      coloraxis2=dict(colorscale="Viridis", cmin=low, cmax=high if high > low else low + 1e-6,
                                      colorbar=dict(title="mult.", x=1.0, len=0.45, y=0.22)))
    title = _title(f"Feature maps of image {c.image} ({exploration.labels[c.image]})", exploration)
    fig = plots.finish_layout(fig, title, height=max(360, 170 * len(channels) + 120))
    fig.update_layout(margin=dict(l=30, r=90, t=110, b=20))
    return fig


def scale_figure(exploration: Exploration, statistic: str | None = None) -> go.Figure:
    """Per phi (side by side): every channel's scale s against one of the statistics it is computed from (m_j, v_j:
    batch mean and variance of the pooled kernel responses; the mean and variance terms of the logit; the logit)."""
    statistic = statistic or exploration.config.statistic
    if statistic not in EXPLORE_STATISTICS:
        raise WorkbenchError(f"statistic must be one of {', '.join(EXPLORE_STATISTICS)}; got {statistic!r}")
    views = exploration.views
    fig = make_subplots(rows=1, cols=len(views), shared_yaxes=True, horizontal_spacing=0.06,
                        subplot_titles=[f"{_short(i)}: {v.label}" for i, v in enumerate(views)])
    shown = set(exploration.config.channels)
    for col, view in enumerate(views, start=1):
        stats = view.stats
        color = [plots.PALETTE[1] if ch in shown else plots.PALETTE[0] for ch in stats["channel"]]
        fig.add_scatter(x=stats[statistic].tolist(), y=stats["scale"].tolist(), mode="markers",
                        marker=dict(color=color, size=[10 if ch in shown else 7 for ch in stats["channel"]]),
                        customdata=stats["channel"].tolist(), showlegend=False,
                        hovertemplate=f"channel %{{customdata}}<br>{statistic} %{{x:.4g}}<br>scale %{{y:.4f}}"
                                      "<extra></extra>", row=1, col=col)
        if statistic == "logit":
            span = np.linspace(min(-1.0, float(stats["logit"].min())), max(1.0, float(stats["logit"].max())), 100)
            fig.add_scatter(x=span.tolist(), y=(1 / (1 + np.exp(-span))).tolist(), mode="lines", showlegend=False,
                            line=dict(color="#999", dash="dot"), hoverinfo="skip", row=1, col=col)
        fig.update_xaxes(title_text=statistic, row=1, col=col)
    fig.update_yaxes(title_text="scale s", row=1, col=1)
    title = _title(f"Per-channel scale s against {statistic} (larger: the channels shown above)", exploration)
    fig = plots.finish_layout(fig, title, height=430)
    fig.update_layout(margin=dict(t=110))
    return fig


def multiplier_figure(exploration: Exploration, bins: int = 60) -> go.Figure:
    """The distribution of the multiplier over the whole batch and every channel, one histogram per phi on shared
    bins (density), with each one's mean and standard deviation; 1 is no perturbation."""
    views = exploration.views
    values = [v.multiplier.reshape(-1).double().numpy() for v in views]
    low, high = min(float(v.min()) for v in values), max(float(v.max()) for v in values)
    edges = np.linspace(low, high if high > low else low + 1e-6, bins + 1)
    fig = go.Figure()
    for i, (view, data) in enumerate(zip(views, values)):
        density, _ = np.histogram(data, bins=edges, density=True)
        stats = view.multiplier_stats
        fig.add_bar(x=((edges[:-1] + edges[1:]) / 2).tolist(), y=density.tolist(), width=float(edges[1] - edges[0]),
                    name=f"{_short(i)}: {view.label} (mean {stats['mean']:.3f}, std {stats['std']:.3f})",
                    marker_color=plots.PALETTE[i], opacity=0.6)
    fig.add_vline(x=1.0, line_color="#555", line_dash="dot")
    fig.update_layout(barmode="overlay", legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(title_text="multiplier 1 + k(s·z − 1)")
    fig.update_yaxes(title_text="density")
    fig = plots.finish_layout(fig, _title("Distribution of the multiplier over the batch", exploration),
                              height=440)
    fig.update_layout(margin=dict(t=110))
    return fig


def figures(exploration: Exploration) -> list[go.Figure]:
    """The explorer's three figures: feature maps, scale against statistic, multiplier distribution."""
    return [feature_maps(exploration), scale_figure(exploration), multiplier_figure(exploration)]


def parse_channels(text: str | Sequence[int]) -> list[int]:
    """``"0, 1, 5"`` (or ``"0-3"``, or a list) -> ``[0, 1, 5]``: the channel control's text."""
    if not isinstance(text, str):
        return [int(c) for c in text]
    out: list[int] = []
    for part in text.replace(";", ",").split(","):
        part = part.strip()
        low, dash, high = part.partition("-")
        try:
            out += list(range(int(low), int(high) + 1)) if dash else ([int(part)] if part else [])
        except ValueError:
            raise WorkbenchError(f"channels {text!r}: write channel indices like '0, 1, 2' or '0-3'") from None
    if not out:
        raise WorkbenchError(f"channels {text!r} names no channel; write e.g. '0, 1, 2, 3'")
    return out


__all__ = ["ARCHS", "Exploration", "PhiExplorer", "SiteView", "UNTRAINED", "channel_statistics", "channel_table",
           "feature_maps", "figures", "multiplier_figure", "parse_channels", "scale_figure", "site_view"]
