"""Attach phi to any CNN without editing its code, and detach it again.

Where the sites go (the original code's placement, generalised):

1. **Residual and other multi-layer blocks** get one site each, at the block's output *before* its final activation
   (the original: after ``out += identity``, before the block's ReLU). A block says how:

   * a class attribute ``site_activation = "<attr>"``: the site runs on the input of that (dedicated) activation
     module (workbench CIFAR ResNets, WRN);
   * a class attribute ``site_output = True``: the site runs on the block's output (blocks with no final activation);
   * torchvision blocks, by class: ``resnet.BasicBlock`` / ``resnet.Bottleneck`` (their ReLU module is shared
     inside the block, so the block's forward is replaced by an equivalent one with the site before the last ReLU),
     ``regnet.ResBottleneckBlock`` (before its ``activation``), and on the output of MobileNetV2/V3 and ShuffleNetV2
     ``InvertedResidual``, EfficientNet ``MBConv`` / ``FusedMBConv`` and DenseNet ``_DenseLayer`` (these blocks end
     without an activation, so the output *is* the pre-activation).

   When a network has blocks, only blocks get sites: the stem and head are not perturbed (as in the original).
2. **Plain conv nets** (no blocks): a site after every BatchNorm2d whose output feeds an activation module
   directly, i.e. conv -> BN -> [site] -> ReLU (VGG, Conv-4/6, torchvision ``vgg*_bn``).

Sizes: a probe forward pass at ``image_size`` finds each site's channel count and the forward order. The scale's
size features use ``channel_norm`` = the widest site (64 for CIFAR ResNets, 512 for VGG-9, the width for Conv-4: the
original's constants) and ``spatial_norm`` = the input image size, unless given.

Each site is registered as a child module named ``perturb_site`` of the module its hook sits on, so its running
statistics are in ``model.state_dict()`` and move with ``model.to(...)``; phi itself is never a model parameter.
Where the activation after a site is a plain ``nn.ReLU`` module (a ``site_activation`` host, torchvision's
``BasicBlock`` / ``Bottleneck``), the site applies that ReLU itself (``site(h, relu=True)``) and the module's forward
is replaced while attached: the same function, one pass fewer over the map each way. When that ReLU is followed, in
the same ``nn.Sequential``, by a ``MaxPool2d(2)`` (kernel 2, stride 2, no padding: Conv-4/6 and VGG-9 blocks), the
site takes over the pool as well (``site(h, relu=True, pool=True)``: on the CPU kernel the full-size output is never
written and the pool's own passes go) and the pool module passes its input through while attached. When a
``BatchNorm2d`` comes right before that ReLU in an ``nn.Sequential`` (conv -> BN -> ReLU [-> pool]), the site takes
the BatchNorm's input and applies it too (``site(x, relu=True, batch_norm=bn)``; the BatchNorm module passes its
input through while attached, its parameters and buffers stay where they are and train as before): the CPU kernel of
a training pass then computes the batch statistics in one pass and never writes the normalised map.
``remove()`` restores all of them.
"""
from __future__ import annotations

import types
from collections import Counter
from typing import Iterator, Optional

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from .errors import WorkbenchError
from .perturb import MetaPerturb, PerturbSite

SITE_ATTR = "perturb_site"
_BATCH_NORM_ATTR = "_perturb_site_batch_norm"  # on a fused ReLU host: the BatchNorm the site applies (not a child)
_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.GELU, nn.LeakyReLU, nn.ELU, nn.Mish)


def _tv_basic_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return getattr(self, SITE_ATTR)(out + identity, relu=True)  # the block's final ReLU, fused into the site


def _tv_bottleneck_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return getattr(self, SITE_ATTR)(out + identity, relu=True)  # the block's final ReLU, fused into the site


def _block_rules() -> dict[type, tuple]:
    """torchvision block classes -> ("forward", fn) | ("pre", activation attribute) | ("output",)."""
    from torchvision.models import densenet, efficientnet, mobilenetv2, mobilenetv3, regnet, resnet, shufflenetv2

    return {
        resnet.BasicBlock: ("forward", _tv_basic_forward),
        resnet.Bottleneck: ("forward", _tv_bottleneck_forward),
        regnet.ResBottleneckBlock: ("pre", "activation"),
        mobilenetv2.InvertedResidual: ("output",),
        mobilenetv3.InvertedResidual: ("output",),
        shufflenetv2.InvertedResidual: ("output",),
        efficientnet.MBConv: ("output",),
        efficientnet.FusedMBConv: ("output",),
        densenet._DenseLayer: ("output",),
    }


def _rule_for(module: nn.Module, rules: dict) -> Optional[tuple]:
    activation = getattr(type(module), "site_activation", None)
    if activation:
        return ("pre", activation)
    if getattr(type(module), "site_output", False):
        return ("output",)
    return rules.get(type(module))


def _pre_hook(module, args):
    return (getattr(module, SITE_ATTR)(args[0]),) + tuple(args[1:])


def _site_then_relu(self, x):
    """Replaces the forward of a site's ``nn.ReLU`` host: the site applies the ReLU itself (on the CPU kernel at no
    extra pass, sparing the activation's own forward and backward passes over the map), and the BatchNorm before it
    when attach fused that too (then ``x`` is the BatchNorm's input)."""
    return getattr(self, SITE_ATTR)(x, relu=True, batch_norm=self.__dict__.get(_BATCH_NORM_ATTR))


def _site_then_relu_and_pool(self, x):
    """Replaces the forward of a site's ``nn.ReLU`` host that a ``MaxPool2d(2)`` follows: the site applies both, and
    the BatchNorm before the ReLU when attach fused that too (then ``x`` is the BatchNorm's input)."""
    return getattr(self, SITE_ATTR)(x, relu=True, pool=True, batch_norm=self.__dict__.get(_BATCH_NORM_ATTR))


def _pooled_by_the_site(self, x):
    """Replaces the forward of that ``MaxPool2d(2)``: its input is already pooled."""
    return x


def _normalized_by_the_site(self, x):
    """Replaces the forward of a BatchNorm2d that the site after it applies: its input goes on unchanged."""
    return x


def _output_hook(module, args, output):
    return getattr(module, SITE_ATTR)(output)


class _Place:
    """Where one site goes: the module that hosts it, how it is wired in, and the 2x2 max-pool (and then the
    BatchNorm before it) it may take over."""

    def __init__(self, name: str, host: nn.Module, how: str, forward=None, pool: Optional[nn.Module] = None,
                 batch_norm: Optional[nn.Module] = None):
        self.name, self.host, self.how, self.forward, self.pool = name, host, how, forward, pool
        self.batch_norm = batch_norm


def _fusable_pool_after(block: nn.Module, attribute: str, uses: Counter) -> Optional[nn.Module]:
    """The ``nn.MaxPool2d`` of kernel 2, stride 2, no padding or dilation, floor mode, that directly follows child
    ``attribute`` of ``block`` when ``block`` is an ``nn.Sequential`` (so the child's output goes nowhere else) and
    the pool is registered nowhere else in the model (``uses``: registrations per module id), since it will pass its
    input through wherever it is called."""
    if not isinstance(block, nn.Sequential):
        return None
    names = list(block._modules)
    following = names.index(attribute) + 1 if attribute in names else len(names)
    if following == len(names):
        return None
    pool = block._modules[names[following]]
    if type(pool) is not nn.MaxPool2d or pool.ceil_mode or pool.return_indices or uses[id(pool)] != 1:
        return None
    if _pair(pool.kernel_size) != (2, 2) or _pair(pool.stride) != (2, 2) or _pair(pool.padding) != (0, 0):
        return None
    return pool if _pair(pool.dilation) == (1, 1) else None


def _fusable_batch_norm_before(block: nn.Module, attribute: str, uses: Counter) -> Optional[nn.Module]:
    """The ``nn.BatchNorm2d`` right before child ``attribute`` of the ``nn.Sequential`` ``block`` (so its output goes
    to that child only), registered nowhere else in the model (it will pass its input through wherever called)."""
    names = list(block._modules)
    position = names.index(attribute) if attribute in names else 0
    if not isinstance(block, nn.Sequential) or position == 0:
        return None
    bn = block._modules[names[position - 1]]
    return bn if type(bn) is nn.BatchNorm2d and uses[id(bn)] == 1 else None


def find_places(model: nn.Module, probe_input: torch.Tensor) -> list[_Place]:
    """Where sites go in ``model`` (rules in the module docstring), as places with ``name``, ``host`` and ``how``
    (``pre``: the host's input, ``output``: its output, ``forward``: a replaced block forward). ``probe_input`` is
    a zero batch of the model's input shape, used by the plain-net rule to see which BatchNorm feeds an activation."""
    rules = _block_rules()
    uses = Counter(id(module) for _, module in model.named_modules(remove_duplicate=False))
    places: list[_Place] = []
    claimed: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in claimed):
            continue
        rule = _rule_for(module, rules)
        if rule is None:
            continue
        claimed.append(name)
        if rule[0] == "pre":
            host = getattr(module, rule[1], None)
            if not isinstance(host, nn.Module):
                raise WorkbenchError(
                    f"block {name} ({type(module).__name__}) names activation '{rule[1]}' but has no such module"
                )
            pool = _fusable_pool_after(module, rule[1], uses) if type(host) is nn.ReLU else None
            bn = _fusable_batch_norm_before(module, rule[1], uses) if type(host) is nn.ReLU else None
            places.append(_Place(f"{name}.{rule[1]}" if name else rule[1], host, "pre", pool=pool, batch_norm=bn))
        elif rule[0] == "output":
            places.append(_Place(name, module, "output"))
        else:
            places.append(_Place(name, module, "forward", rule[1]))
    if places:
        return places
    return _bn_before_activation_places(model, probe_input)


def _bn_before_activation_places(model: nn.Module, probe_input: torch.Tensor) -> list[_Place]:
    """Plain nets: BatchNorm2d modules whose output tensor is passed straight into an activation module."""
    names = {module: name for name, module in model.named_modules()}
    bn_outputs: dict[int, nn.Module] = {}
    found: list[nn.Module] = []
    handles = []

    def after_bn(module, args, output):
        bn_outputs[id(output)] = module

    def before_activation(module, args):
        source = bn_outputs.get(id(args[0])) if args else None
        if source is not None and source not in found:
            found.append(source)

    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_hook(after_bn))
        elif isinstance(module, _ACTIVATIONS):
            handles.append(module.register_forward_pre_hook(before_activation))
    try:
        _probe(model, probe_input)
    finally:
        for handle in handles:
            handle.remove()
    return [_Place(names[bn], bn, "output") for bn in found]


def _probe(model: nn.Module, probe_input: torch.Tensor) -> None:
    """Run one no-grad eval-mode forward pass on ``probe_input`` (training flags restored afterwards)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            model(probe_input)
    except WorkbenchError:
        raise
    except Exception as exc:
        raise WorkbenchError(
            f"the probe forward pass of {type(model).__name__} at input shape {tuple(probe_input.shape)} failed "
            f"({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); pass the image_size the model is used at"
        ) from None
    finally:
        for module, mode in modes.items():
            module.training = mode


def _input_channels(model: nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise WorkbenchError(f"{type(model).__name__} has no Conv2d layer: MetaPerturb attaches to convolutional networks")


class PerturbHandle:
    """What :func:`attach` returns: the sites in forward order, phi, and :meth:`remove`."""

    def __init__(self, model: nn.Module, phi: MetaPerturb, places: list[_Place], sites: list[PerturbSite], hooks):
        self.model = model
        self.phi = phi
        self._places = places
        self.sites = sites
        self.site_names = [p.name for p in places]
        self._hooks = hooks
        self._attached = True

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self) -> Iterator[PerturbSite]:
        return iter(self.sites)

    def __repr__(self) -> str:
        state = "attached" if self._attached else "removed"
        return f"PerturbHandle({len(self.sites)} sites on {type(self.model).__name__}, {state})"

    def phi_parameters(self) -> list[nn.Parameter]:
        return list(self.phi.parameters())

    def set_noise_coeff(self, value: float) -> None:
        for site in self.sites:
            site.noise_coeff = float(value)

    def set_clip(self, value: Optional[float]) -> None:
        for site in self.sites:
            site.clip = None if value is None else float(value)

    def set_active(self, active: bool) -> None:
        for site in self.sites:
            site.active = bool(active)

    def scales(self) -> list[Optional[torch.Tensor]]:
        """Per-site (C,) scales s from the last forward pass (None for a site not yet run)."""
        return [site.last_scale for site in self.sites]

    def multiplier_stats(self) -> list[Optional[dict]]:
        return [site.last_multiplier_stats for site in self.sites]

    def remove(self) -> None:
        """Detach every site: hooks, forward overrides and the ``perturb_site`` children go; the model is as before."""
        if not self._attached:
            return
        for hook in self._hooks:
            hook.remove()
        for place in self._places:
            if "forward" in vars(place.host):  # a replaced block forward or a fused ReLU
                del place.host.forward
            if place.pool is not None and "forward" in vars(place.pool):
                del place.pool.forward
            if place.batch_norm is not None and "forward" in vars(place.batch_norm):
                del place.batch_norm.forward
            place.host.__dict__.pop(_BATCH_NORM_ATTR, None)
            if hasattr(place.host, SITE_ATTR):
                delattr(place.host, SITE_ATTR)
        self._attached = False


def attach(
    model: nn.Module,
    phi: MetaPerturb,
    image_size: int | tuple[int, int] = 32,
    channel_norm: Optional[float] = None,
    spatial_norm: Optional[float] = None,
    in_channels: Optional[int] = None,
) -> PerturbHandle:
    """Insert one :class:`PerturbSite` sharing ``phi`` at every site of ``model`` (rules in the module docstring)."""
    if not isinstance(phi, MetaPerturb):
        raise WorkbenchError(f"attach needs a MetaPerturb phi, got {type(phi).__name__}")
    if any(isinstance(m, PerturbSite) for m in model.modules()):
        raise WorkbenchError("this model already has perturbation sites; call handle.remove() before attaching again")
    height, width = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    reference = next(iter(model.parameters()), None)
    device = reference.device if reference is not None else torch.device("cpu")
    probe_input = torch.zeros(
        2, in_channels or _input_channels(model), height, width,
        device=device, dtype=reference.dtype if reference is not None else torch.float32,
    )
    places = find_places(model, probe_input)
    if not places:
        raise WorkbenchError(
            f"no perturbation site found in {type(model).__name__}: it has no residual blocks the workbench knows "
            "and no BatchNorm2d followed by an activation module; give its blocks a `site_activation` or "
            "`site_output` class attribute"
        )

    # Probe for each site's channel count and the forward order.
    order: list[tuple[int, int]] = []

    def shape_recorder(index):
        def record(module, args, output=None):
            tensor = output if output is not None else args[0]
            order.append((index, tensor.shape[1]))

        return record

    probes = []
    for index, place in enumerate(places):
        if place.how == "pre":
            probes.append(place.host.register_forward_pre_hook(shape_recorder(index)))
        else:  # a block's output has its pre-activation's channel count
            probes.append(place.host.register_forward_hook(shape_recorder(index)))
    try:
        _probe(model, probe_input)
    finally:
        for handle in probes:
            handle.remove()
    seen: dict[int, int] = {}
    for index, channels in order:
        seen.setdefault(index, channels)
    unreached = [places[i].name for i in range(len(places)) if i not in seen]
    if unreached:
        raise WorkbenchError(f"perturbation sites {unreached[:3]} are never reached by the forward pass")
    forward_order = sorted(seen, key=lambda i: [k for k, _ in order].index(i))
    places = [places[i] for i in forward_order]
    channels = [seen[i] for i in forward_order]

    channel_norm = float(channel_norm or getattr(model, "channel_norm", None) or max(channels))
    spatial_norm = float(spatial_norm or height)
    sites, hooks = [], []
    for place, c in zip(places, channels):
        site = PerturbSite(phi, c, channel_norm, spatial_norm).to(device)
        site.train(place.host.training)
        place.host.add_module(SITE_ATTR, site)
        if place.how == "pre" and type(place.host) is nn.ReLU:
            if place.pool is not None:
                place.host.forward = types.MethodType(_site_then_relu_and_pool, place.host)
                place.pool.forward = types.MethodType(_pooled_by_the_site, place.pool)
            else:
                place.host.forward = types.MethodType(_site_then_relu, place.host)
            if place.batch_norm is not None:
                place.host.__dict__[_BATCH_NORM_ATTR] = place.batch_norm  # a plain attribute: not a second child
                place.batch_norm.forward = types.MethodType(_normalized_by_the_site, place.batch_norm)
        elif place.how == "pre":
            hooks.append(place.host.register_forward_pre_hook(_pre_hook))
        elif place.how == "output":
            hooks.append(place.host.register_forward_hook(_output_hook))
        else:
            place.host.forward = types.MethodType(place.forward, place.host)
        sites.append(site)
    return PerturbHandle(model, phi, places, sites, hooks)


__all__ = ["attach", "find_places", "PerturbHandle", "SITE_ATTR"]
