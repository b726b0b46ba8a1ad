"""The MetaPerturb perturbation function phi and the per-site state that applies it.

For a feature map h of shape (B, C, H, W) at one site (notation of ``../shared/reference/README.md``):

* channel-equivariant layer ``E(h)_c = K_id * h_c + K_all * mean_c'(h_c')`` (3x3, zero padding, no bias; the same two
  kernels for every channel, so permuting channels permutes the output);
* noise ``z = softplus(mu + eps)`` with ``mu = E2(relu(E1(h)))`` and ``eps ~ N(0, 1)`` elementwise;
* scale ``s_c = sigmoid(w . [m_c, v_c, C / channel_norm, H / spatial_norm])`` where ``f_{b,c,j}`` is the spatial mean
  of ``relu(K_j * h_{b,c})`` (four shared kernels), and ``m_c``, ``v_c`` its batch mean and unbiased batch variance
  (training) or their running averages (evaluation);
* output ``h * (1 + k * (s * z - 1))``, then ``min(., clip)`` when a clip value is set; the layer's own ReLU follows.

phi has 82 parameters: 4 x 9 for the two equivariant layers, 4 x 9 for the scale kernels, 10 for the linear map.

Running-variance convention: like the original code, the running variance is updated with the *unbiased* batch
variance multiplied once more by B / (B - 1) (``double_bessel=True``, the default), which is what the authors'
released phi saw during its own evaluation and what ``official_reference_shared.npz`` records. Pass
``double_bessel=False`` for the textbook single correction.

Speed: on the CPU a site runs a fused C++ kernel (``_native.py``: two sweeps over the channels_last map, built on
first use; ``WORKBENCH_NATIVE=0`` turns it off); otherwise, and on GPUs, the eager fast path (``_fused.py``) computes
the same function in channels_last, where PyTorch's depthwise convolutions are ~5x faster than in NCHW. Both are
checked against ``reference_perturb``, a direct transcription of the original code.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import _native, compiled as _compiled
from ._fused import NoiseTail, ReluMean, batch_norm as apply_batch_norm, relu_and_pool, site_scale, standard_normal
from .errors import WorkbenchError

FORMAT_NAME = "workbench.metaperturb"
FORMAT_VERSION = 1

# Official release key -> our parameter name.
_OFFICIAL_KEYS = {
    "phi_1.w_identity": "noise1.w_identity",
    "phi_1.w_all": "noise1.w_all",
    "phi_2.w_identity": "noise2.w_identity",
    "phi_2.w_all": "noise2.w_all",
    "kernel": "scale_kernels",
    "fc.weight": "scale_fc.weight",
}
_NUM_SCALE_KERNELS = 4


def _depthwise(h: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Apply one (1, 1, 3, 3) kernel to every channel of ``h`` (zero padding 1)."""
    channels = h.shape[1]
    return F.conv2d(h, kernel.expand(channels, 1, 3, 3), padding=1, groups=channels)


def _single_channel_conv(m: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """conv3x3 of a (B, 1, H, W) map, run as a depthwise conv over a (1, B, H, W) view.

    Same numbers as ``F.conv2d(m, kernel, padding=1)``; a one-channel convolution takes a slow CPU path (~10x).
    """
    b, _, height, width = m.shape
    batch_as_channels = m.reshape(1, b, height, width).contiguous(memory_format=torch.channels_last)
    return _depthwise(batch_as_channels, kernel).reshape(b, 1, height, width)


def equivariant(h: torch.Tensor, w_identity: torch.Tensor, w_all: torch.Tensor) -> torch.Tensor:
    """``E(h)_c = w_identity * h_c + w_all * mean_c(h)``: a DeepSets layer over channels with 3x3 kernels."""
    pooled = _single_channel_conv(h.mean(dim=1, keepdim=True), w_all)
    return _depthwise(h, w_identity) + pooled


def _relu_mean(y: torch.Tensor) -> torch.Tensor:
    return F.relu(y).mean(dim=(2, 3))


def _scale_features_fast(h: torch.Tensor, scale_kernels: torch.Tensor, fused: bool = True) -> torch.Tensor:
    """f[b, c, j] = spatial mean of relu(K_j * h[b, c]) as four depthwise convolutions; shape (B, C, 4)."""
    relu_mean = ReluMean.apply if fused else _relu_mean
    return torch.stack([relu_mean(_depthwise(h, scale_kernels[j : j + 1])) for j in range(scale_kernels.shape[0])], dim=2)


class EquivariantLayer(nn.Module):
    """Two shared 3x3 kernels: one applied to each channel, one to the channel mean (broadcast to all channels)."""

    def __init__(self, init_std: float = 0.01):
        super().__init__()
        self.w_identity = nn.Parameter(torch.randn(1, 1, 3, 3) * init_std)
        self.w_all = nn.Parameter(torch.randn(1, 1, 3, 3) * init_std)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return equivariant(h, self.w_identity, self.w_all)


class MetaPerturb(nn.Module):
    """phi: the 82-parameter perturbation function shared by every site of every network.

    It holds parameters only; per-site running statistics live in :class:`PerturbSite`.
    """

    def __init__(self, init_std: float = 0.01):
        super().__init__()
        self.noise1 = EquivariantLayer(init_std)
        self.noise2 = EquivariantLayer(init_std)
        self.scale_kernels = nn.Parameter(torch.randn(_NUM_SCALE_KERNELS, 1, 3, 3) * init_std)
        self.scale_fc = nn.Linear(2 * _NUM_SCALE_KERNELS + 2, 1, bias=False)
        nn.init.normal_(self.scale_fc.weight, std=init_std)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def function_tensors(self) -> tuple:
        """(noise1.w_identity, noise1.w_all, noise2.w_identity, noise2.w_all, scale_kernels, scale_fc.weight): the six
        tensors the fused kernel reads, looked up in the modules' own dicts. Every site of every layer asks on every
        call, and ``parameters()`` or the ``nn.Module`` attribute lookups cost tens of microseconds there (the caches
        are cold right after a large map's sweep)."""
        modules = self._modules
        noise1, noise2 = modules["noise1"]._parameters, modules["noise2"]._parameters
        return (noise1["w_identity"], noise1["w_all"], noise2["w_identity"], noise2["w_all"],
                self._parameters["scale_kernels"], modules["scale_fc"]._parameters["weight"])

    def extra_repr(self) -> str:
        return f"parameters={self.num_parameters}"

    # ----------------------------------------------------------------------------------------- the function
    def noise_mean(self, h: torch.Tensor) -> torch.Tensor:
        """mu = E2(relu(E1(h))), the mean of the pre-softplus Gaussian noise (reference form)."""
        return self.noise2(F.relu(self.noise1(h)))

    def scale_features(self, h: torch.Tensor) -> torch.Tensor:
        """f[b, c, j] = spatial mean of relu(K_j * h[b, c]), shape (B, C, 4) (reference form)."""
        b, c, height, width = h.shape
        maps = F.conv2d(h.reshape(b * c, 1, height, width), self.scale_kernels, padding=1)
        return F.relu(maps).mean(dim=(2, 3)).view(b, c, _NUM_SCALE_KERNELS)

    def channel_scale(self, mean: torch.Tensor, var: torch.Tensor, channel_ratio: float, size_ratio: float):
        """s_c = sigmoid(w . [m_c, v_c, C/channel_norm, H/spatial_norm]) for (C, 4) statistics; returns (C,)."""
        # the two constant inputs enter as weight * ratio: a tensor built from Python floats would be a host-to-device
        # copy on a GPU (which also rules out CUDA-graph capture)
        w = self.scale_fc.weight[0]
        k = _NUM_SCALE_KERNELS
        pre = mean @ w[:k] + var @ w[k:2 * k] + (w[2 * k] * channel_ratio + w[2 * k + 1] * size_ratio)
        return torch.sigmoid(pre)

    # ----------------------------------------------------------------------------------------- persistence
    @classmethod
    def from_official(cls, path: str | os.PathLike, map_location="cpu") -> "MetaPerturb":
        """Load the authors' release (``perturb_750.pth``: a legacy pickle of a state dict saved from CUDA)."""
        state = _load_state(path, map_location)
        return cls._from_official_state(state, path)

    @classmethod
    def _from_official_state(cls, state: dict, path) -> "MetaPerturb":
        missing = sorted(set(_OFFICIAL_KEYS) - set(state))
        if missing or set(state) - set(_OFFICIAL_KEYS):
            raise WorkbenchError(
                f"{path} is not a MetaPerturb release: expected keys {sorted(_OFFICIAL_KEYS)}, found {_key_list(state)}"
            )
        phi = cls()
        phi._load_checked({_OFFICIAL_KEYS[k]: v for k, v in state.items()}, path)
        return phi

    @classmethod
    def load(cls, path: str | os.PathLike, map_location="cpu") -> "MetaPerturb":
        """Load phi saved by :meth:`save`, or the authors' release format (detected by its keys)."""
        state = _load_state(path, map_location)
        if state.get("format") == FORMAT_NAME:
            version = state.get("version")
            if version != FORMAT_VERSION:
                raise WorkbenchError(
                    f"{path} is a phi file of format version {version}; this workbench reads version "
                    f"{FORMAT_VERSION}: upgrade the workbench or re-save the file"
                )
            return cls.from_state_dict(state.get("state_dict", {}), path)
        if set(state) & set(_OFFICIAL_KEYS):
            return cls._from_official_state(state, path)
        raise WorkbenchError(
            f"{path} is not a phi file: expected a workbench phi (format '{FORMAT_NAME}') or the authors' "
            f"perturb_750.pth, found keys {_key_list(state)[:8]}"
        )

    @classmethod
    def from_state_dict(cls, state, origin="phi") -> "MetaPerturb":
        """phi from a state dict (e.g. the ``phi`` of a saved network), checked as :meth:`load` checks a file: the
        right names, shapes, floating-point tensors and finite values. ``origin`` names the source in errors."""
        phi = cls()
        phi._load_checked(state, origin)
        return phi

    def save(self, path: str | os.PathLike, **metadata) -> Path:
        """Write phi atomically in the workbench format (state dict + format tag + free-form metadata)."""
        from .artifacts import atomic_torch_save

        payload = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "metadata": {k: v for k, v in metadata.items()},
        }
        path = Path(path)
        atomic_torch_save(payload, path)
        return path

    def _load_checked(self, state, path) -> None:
        """Load ``state`` after checking it is phi's: a mapping of phi's parameter names to floating-point tensors of
        the right shapes with finite values (NaN or inf would train on silently and evaluate to nonsense)."""
        if not isinstance(state, Mapping):
            raise WorkbenchError(f"{path}: phi's state is a {type(state).__name__}, not a mapping of parameter names "
                                 f"to tensors; not a MetaPerturb phi (re-save it with MetaPerturb.save)")
        expected = {k: tuple(v.shape) for k, v in self.state_dict().items()}
        if set(state) != set(expected):
            raise WorkbenchError(f"{path} does not hold phi's parameters: expected {sorted(expected)}, found "
                                 f"{_key_list(state)}")
        for key, shape in expected.items():
            value = state[key]
            if not isinstance(value, torch.Tensor):
                raise WorkbenchError(f"{path}: parameter {key} is a {type(value).__name__}, not a tensor; not a "
                                     f"MetaPerturb phi")
            if tuple(value.shape) != shape:
                raise WorkbenchError(
                    f"{path}: parameter {key} has shape {tuple(value.shape)}, expected {shape}; not a MetaPerturb phi"
                )
            if not value.is_floating_point():
                raise WorkbenchError(f"{path}: parameter {key} has dtype {value.dtype}, expected floating point; not a "
                                     f"MetaPerturb phi")
            if not bool(torch.isfinite(value).all()):
                bad = int((~torch.isfinite(value)).sum())
                raise WorkbenchError(f"{path}: parameter {key} holds {bad} NaN or infinite value(s) of "
                                     f"{value.numel()}; this phi is damaged or came from a diverged run: use another "
                                     f"phi file")
        with torch.no_grad():
            self.load_state_dict({k: state[k].float() for k in expected})


def _key_list(state) -> list[str]:
    """The keys of a loaded mapping as sorted strings (a foreign file may mix key types, which ``sorted`` refuses)."""
    return sorted(k if isinstance(k, str) else f"{k!r} ({type(k).__name__})" for k in state)


def _load_state(path, map_location) -> dict:
    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"phi file {path} does not exist; give the path of a saved phi or of perturb_750.pth")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkbenchError(f"cannot read phi file {path} ({first[:160]}); is it a torch checkpoint?") from None
    if not isinstance(state, dict):
        raise WorkbenchError(f"{path} holds a {type(state).__name__}, not a state dict of phi")
    return state


def perturb(
    h: torch.Tensor,
    phi: MetaPerturb,
    running_mean: torch.Tensor,
    running_var: torch.Tensor,
    *,
    channel_norm: float,
    spatial_norm: float,
    training: bool,
    momentum: float = 0.1,
    noise_coeff: float | torch.Tensor = 1.0,
    clip: Optional[float] = None,
    eps: Optional[torch.Tensor] = None,
    double_bessel: bool = True,
    fused: bool = True,
    relu: bool = False,
    pool: bool = False,
    batch_norm: Optional[nn.BatchNorm2d] = None,
    compiled: bool = False,
    multiplier_stats: bool = True,
):
    """Apply phi to ``h`` (B, C, H, W); returns ``(out, scale, multiplier)`` (the multiplier map, or its
    ``[mean, std]`` where the fused CPU kernel serves a frozen phi: see ``workbench._native``). ``relu`` applies the
    layer's ReLU to ``out`` as well, and ``pool`` then the layer's 2x2 max-pool of stride 2 (attach fuses a site
    with the ReLU module it feeds, and with a ``MaxPool2d(2)`` right after that). With ``batch_norm``, ``h`` is
    that BatchNorm2d's input and the site perturbs its output (attach passes the BatchNorm in front of a pooled site;
    the fused CPU kernel then folds it into its own passes).

    In training mode the batch statistics are used and ``running_mean``/``running_var`` (C, 4) are updated in place;
    otherwise the running ones are used. ``eps`` is the standard-normal draw (drawn here when None).
    ``fused=False`` computes the same function with plain autograd ops only (slower, but differentiable twice, as
    the second-order look-ahead of meta-training needs); the fused pieces have hand-written first derivatives.
    ``compiled`` (with ``fused``) runs the site compiled by ``torch.compile`` (``workbench.compiled``; the eager path
    serves when that compilation failed); so does a 0-d tensor ``noise_coeff`` (the CUDA-graph step's), compiled or
    not. There the multiplier comes back as its ``[mean, std]``, or None without ``multiplier_stats``.
    """
    if fused and (compiled or isinstance(noise_coeff, torch.Tensor)):
        served = _compiled.perturb(h, phi, running_mean, running_var, channel_norm=channel_norm,
                                   spatial_norm=spatial_norm, training=training, momentum=momentum,
                                   noise_coeff=noise_coeff, clip=clip, eps=eps, double_bessel=double_bessel,
                                   relu=relu, pool=pool, batch_norm=batch_norm, compile=compiled,
                                   stats=multiplier_stats)
        if served is not None:
            return served
    if fused and _native.available(h, phi):
        return _native.perturb(h, phi, running_mean, running_var, channel_norm=channel_norm,
                               spatial_norm=spatial_norm, training=training, momentum=momentum,
                               noise_coeff=noise_coeff, clip=clip, eps=eps, double_bessel=double_bessel,
                               relu=relu, pool=pool, batch_norm=batch_norm)
    if batch_norm is not None:
        h = apply_batch_norm(batch_norm, h)
    b, c, height, width = h.shape
    layout_in = torch.channels_last if h.is_contiguous(memory_format=torch.channels_last) and not h.is_contiguous() else None
    x = h.contiguous(memory_format=torch.channels_last)

    mu = equivariant(F.relu(equivariant(x, phi.noise1.w_identity, phi.noise1.w_all)), phi.noise2.w_identity, phi.noise2.w_all)

    if training:
        if b < 2:
            raise WorkbenchError(
                "a perturbation site in training mode needs a batch of at least 2 (it uses the batch variance); "
                "use a larger batch or call model.eval()"
            )
        features = _scale_features_fast(x, phi.scale_kernels, fused)
    else:
        features = None
    scale = site_scale(phi, features, running_mean, running_var, c / channel_norm, height / spatial_norm,
                       momentum, double_bessel)

    if eps is None:
        eps = standard_normal(x)
    if fused:
        out, multiplier = NoiseTail.apply(x, mu, scale, eps, float(noise_coeff), None if clip is None else float(clip))
    else:
        multiplier = scale.view(1, c, 1, 1) * F.softplus(mu + eps)
        if noise_coeff != 1.0:
            multiplier = 1 + noise_coeff * (multiplier - 1)
        out = x * multiplier
        out = out.clamp(max=clip) if clip is not None else out
        multiplier = multiplier.detach()
    out = relu_and_pool(out, relu, pool)
    if layout_in is None:
        out = out.contiguous()
    return out, scale, multiplier


class PerturbSite(nn.Module):
    """One perturbation place in a network: phi (shared, not registered) plus this place's running statistics."""

    def __init__(
        self,
        phi: MetaPerturb,
        channels: int,
        channel_norm: float,
        spatial_norm: float,
        momentum: float = 0.1,
        double_bessel: bool = True,
    ):
        super().__init__()
        if not isinstance(phi, MetaPerturb):
            raise WorkbenchError(f"PerturbSite needs a MetaPerturb phi, got {type(phi).__name__}")
        if channels < 1 or channel_norm <= 0 or spatial_norm <= 0:
            raise WorkbenchError(
                f"PerturbSite needs channels >= 1 and positive norms, got channels={channels}, "
                f"channel_norm={channel_norm}, spatial_norm={spatial_norm}"
            )
        self._phi = [phi]  # a list keeps phi out of this module's (and the host model's) parameters
        self.channels = int(channels)
        self.channel_norm = float(channel_norm)
        self.spatial_norm = float(spatial_norm)
        self.momentum = float(momentum)
        self.double_bessel = bool(double_bessel)
        self.noise_coeff = 1.0
        self.clip: Optional[float] = None
        self.active = True
        self.fused = True  # False: plain autograd ops, differentiable twice (see `perturb`)
        self.compiled = False  # True: the torch.compile'd site (`workbench.compiled`; with `fused` only)
        self.register_buffer("running_mean", torch.zeros(channels, _NUM_SCALE_KERNELS))
        self.register_buffer("running_var", torch.ones(channels, _NUM_SCALE_KERNELS))
        self.record_stats = True  # keep the last scale and multiplier for inspection (cheap: no copy, no sync)
        self.last_scale: Optional[torch.Tensor] = None
        self._last_multiplier: Optional[torch.Tensor] = None

    @property
    def phi(self) -> MetaPerturb:
        return self._phi[0]

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, channel_norm={self.channel_norm:g}, spatial_norm={self.spatial_norm:g}, "
            f"noise_coeff={self.noise_coeff:g}, clip={self.clip}, active={self.active}"
        )

    def forward(self, h: torch.Tensor, eps: Optional[torch.Tensor] = None, relu: bool = False,
                pool: bool = False, batch_norm: Optional[nn.BatchNorm2d] = None) -> torch.Tensor:
        """The perturbed map; with ``relu``, the ReLU of it (the site then stands in for the layer's ReLU), and with
        ``pool`` also its 2x2 max-pool of stride 2 (the site stands in for the layer's ``MaxPool2d(2)`` too). With
        ``batch_norm``, ``h`` is the input of that BatchNorm2d and the site perturbs its output (attach: see there)."""
        if not self.active:
            h = h if batch_norm is None else apply_batch_norm(batch_norm, h)
            return relu_and_pool(h, relu, pool)
        if h.dim() != 4:
            raise WorkbenchError(
                f"a perturbation site expects a (B, C, H, W) feature map, got shape {tuple(h.shape)}"
            )
        if h.shape[1] != self.channels:
            raise WorkbenchError(
                f"this perturbation site was built for {self.channels} channels but got {h.shape[1]} "
                f"(shape {tuple(h.shape)}); re-attach phi to the model"
            )
        if eps is not None and eps.shape != h.shape:
            raise WorkbenchError(f"eps has shape {tuple(eps.shape)} but the feature map has {tuple(h.shape)}")
        out, scale, multiplier = perturb(
            h,
            self.phi,
            self.running_mean,
            self.running_var,
            channel_norm=self.channel_norm,
            spatial_norm=self.spatial_norm,
            training=self.training,
            momentum=self.momentum,
            noise_coeff=self.noise_coeff,
            clip=self.clip,
            eps=eps,
            double_bessel=self.double_bessel,
            fused=self.fused,
            relu=relu,
            pool=pool,
            batch_norm=batch_norm,
            compiled=self.compiled,
            multiplier_stats=self.record_stats,
        )
        if self.record_stats:  # plain attributes: set past nn.Module.__setattr__'s checks, on every call
            self.__dict__["last_scale"] = scale.detach()
            self.__dict__["_last_multiplier"] = multiplier
        return out

    @property
    def last_multiplier_stats(self) -> Optional[dict]:
        """Mean and standard deviation of the last forward's multiplier ``1 + k (s z - 1)`` (None before one)."""
        stats = self.last_multiplier_stats_tensor()
        return None if stats is None else {"mean": stats[0].item(), "std": stats[1].item()}

    def last_multiplier_stats_tensor(self) -> Optional[torch.Tensor]:
        """``[mean, std]`` of the last forward's multiplier as a (2,) tensor on the site's device: no host sync, for
        code that gathers the statistics of many sites before reading them (None before a forward)."""
        m = self._last_multiplier
        if m is None:
            return None
        if m.dim() == 1:  # the fused kernel's [mean, std]: it never writes the map
            return m
        return torch.stack([m.mean(), m.std()])


def reference_perturb(h, phi: MetaPerturb, running_mean, running_var, *, channel_norm, spatial_norm, eps, clip=None,
                      noise_coeff=1.0, training=True, momentum=0.1, double_bessel=True):
    """A direct transcription of the original code (NCHW, one op per formula term): the check for the fast path."""
    b, c, height, width = h.shape
    mu = phi.noise_mean(h)
    features = phi.scale_features(h)
    if training:
        mean, var = features.mean(0), features.var(0)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var * (b / (b - 1) if double_bessel else 1.0))
    else:
        mean, var = running_mean, running_var
    scale = phi.channel_scale(mean, var, c / channel_norm, height / spatial_norm)
    z = F.softplus(mu + eps)
    out = h * (1 + noise_coeff * (scale.view(1, c, 1, 1) * z - 1))
    return out.clamp(max=clip) if clip is not None else out


__all__ = ["MetaPerturb", "PerturbSite", "perturb", "reference_perturb", "equivariant", "FORMAT_NAME"]
