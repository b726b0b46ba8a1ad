"""Did phi learn? A probe of phi's *function*, compared with the phi it started from and with the authors' phi.

A phi's weights can move (or shrink under weight decay) while what it does stays where it started: a phi near its
initialisation gives a scale of about 0.5 at every site and channel (``sigmoid`` of almost 0) and noise
``softplus(N(0, 1))`` that does not depend on the features. So the verdict is taken on the function:

- :func:`probe_phi` attaches phi to a fresh network (seeded), runs a fixed batch of images through it in training
  mode with a fixed noise draw, and records each site's per-channel scale and the mean and standard deviation of
  its multiplier ``s * z``;
- :func:`function_change` is the largest change, over the sites, of the mean scale and of the multiplier's mean
  and standard deviation between two probes on the same network, images and noise;
- :func:`diagnose` compares a phi with its initialisation: ``learned`` when that change reaches
  :data:`LEARNED_THRESHOLD`. The shipped 60-step ResNet-20 run moved its scales by about 0.003 (0.497 everywhere);
  a Conv-4 run that learned moved them by more than 0.1 (shared/measured.md).

The record (``records/phi_diagnostics.json`` of a meta-train run) also holds phi's parameter distance from its
initialisation and from the authors' phi, and the authors' phi's probe on the same network for comparison.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from ._runtime import derive_seed
from .perturb import MetaPerturb

LEARNED_THRESHOLD = 0.02  # smallest function change (scale or multiplier statistic, at some site) called learning
OFFICIAL_PHI_FILE = "official_perturb_750.pth"
DIAGNOSTICS_RECORD = "phi_diagnostics"  # records/phi_diagnostics.json of a meta-train run
UNLEARNED_NOTE = "did not learn"
PHI_INIT_FILE = "phi_init.pt"  # a meta-train run's phi at step 0: the untrained-phi control and the diagnostics compare with it
PHI_INIT_STD = 0.01  # a fresh phi's tensors ~ N(0, PHI_INIT_STD^2)
SEED_PHI = 0  # the purpose id of phi's initialisation among a meta-train run's derived seeds (_runtime.derive_seed)


@dataclass
class PhiProbe:
    """phi's function on one fixed batch: per site the per-channel scale and the multiplier's mean and std."""

    site_names: list[str]
    scales: list[np.ndarray]          # per site: (C,) scale s
    multiplier_mean: np.ndarray       # (sites,)
    multiplier_std: np.ndarray        # (sites,)

    @property
    def scale_mean(self) -> np.ndarray:
        return np.asarray([float(s.mean()) for s in self.scales])

    @property
    def scale_channel_std(self) -> np.ndarray:
        return np.asarray([float(s.std()) for s in self.scales])


@torch.no_grad()
def probe_phi(phi: MetaPerturb, arch: str, images: torch.Tensor, *, num_classes: int, image_size: int,
              seed: int = 0) -> PhiProbe:
    """phi's scales and multiplier statistics at every site of a fresh ``arch`` (initialised from ``seed``), fed
    ``images`` (normalised, ``(B, C, H, W)``) in training mode (batch statistics) with noise drawn from ``seed``.

    The same ``seed`` gives the same network and noise, so two phis probed alike differ only by their function.
    """
    from .attach import attach
    from .models import build

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build(arch, num_classes, in_channels=int(images.shape[1]), image_size=image_size)
        probe = MetaPerturb()
        probe.load_state_dict({k: v.detach().cpu() for k, v in phi.state_dict().items()})
        probe.requires_grad_(False)
        handle = attach(model, probe, image_size=image_size)
        handle.set_noise_coeff(1.0)
        handle.set_clip(None)
        for site in handle.sites:
            site.record_stats = True
        model.train()
        torch.manual_seed(seed + 1)
        model(images.cpu().float())
        scales = [s.detach().cpu().double().numpy().reshape(-1) for s in handle.scales()]
        stats = [site.last_multiplier_stats for site in handle.sites]
        names = list(handle.site_names)
        handle.remove()
    return PhiProbe(names, scales, np.asarray([s["mean"] for s in stats]), np.asarray([s["std"] for s in stats]))


def function_change(before: PhiProbe, after: PhiProbe) -> float:
    """The largest change over sites of the mean scale, the multiplier's mean and the multiplier's std."""
    deltas = [np.abs(after.scale_mean - before.scale_mean), np.abs(after.multiplier_mean - before.multiplier_mean),
              np.abs(after.multiplier_std - before.multiplier_std)]
    return float(np.max(np.stack(deltas)))


def parameter_distance(phi: MetaPerturb, other: MetaPerturb) -> float:
    """Euclidean distance between the two phis' 82 parameters."""
    a = torch.cat([p.detach().reshape(-1).cpu().double() for p in phi.parameters()])
    b = torch.cat([p.detach().reshape(-1).cpu().double() for p in other.parameters()])
    return float((a - b).norm())


def initial_phi(seed: int, init_std: float = PHI_INIT_STD) -> MetaPerturb:
    """The phi a run of seed ``seed`` starts from (every tensor ~ N(0, init_std^2), drawn from the run's own stream):
    the meta-trainer's starting point and the untrained-phi control (``metaperturb_untrained``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(seed, SEED_PHI))
        return MetaPerturb(init_std=init_std)


def official_phi_path() -> Path:
    """The authors' released phi: ``$WORKBENCH_REFERENCE/official_perturb_750.pth`` if set, else
    ``<repository>/../shared/reference/official_perturb_750.pth``."""
    env = os.environ.get("WORKBENCH_REFERENCE")
    if env:
        return Path(env).expanduser() / OFFICIAL_PHI_FILE
    return Path(__file__).resolve().parents[1].parent / "shared" / "reference" / OFFICIAL_PHI_FILE


def official_phi() -> Optional[MetaPerturb]:
    """The authors' released phi, or None where its file is not found (the comparison is then left out)."""
    from .errors import WorkbenchError
    path = official_phi_path()
    if not path.is_file():
        return None
    try:
        return MetaPerturb.load(path)
    except WorkbenchError:
        return None


def trained_by(store: Any, run_id: str) -> Optional[str]:
    """The meta-training run whose phi a run id names: the run itself, or a ``meta_select`` run's chosen run
    (None while a selection has chosen none, or when the chosen run is missing from the store)."""
    record = store.run_record(run_id)
    if record.kind != "meta_select":
        return run_id
    chosen = record.summary.get("chosen_run_id") if isinstance(record.summary, dict) else None
    if not isinstance(chosen, str) or not (store.runs_dir / chosen / "run.json").is_file():
        return None
    return chosen


def verdict_text(learned: bool, change: float, threshold: float = LEARNED_THRESHOLD) -> str:
    if learned:
        return f"learned: phi's function moved by {change:.3f} from its initialisation (threshold {threshold:g})"
    return (f"{UNLEARNED_NOTE}: phi's function moved by only {change:.4f} from its initialisation (threshold "
            f"{threshold:g}); it acts as an untrained phi")


def diagnose(phi: MetaPerturb, initial: MetaPerturb, arch: str, images: torch.Tensor, *, num_classes: int,
             image_size: int, seed: int = 0, threshold: float = LEARNED_THRESHOLD) -> dict[str, Any]:
    """The diagnostics record of ``phi`` against its initialisation ``initial`` (and the authors' phi, if found)."""
    kwargs = dict(num_classes=num_classes, image_size=image_size, seed=seed)
    final = probe_phi(phi, arch, images, **kwargs)
    start = probe_phi(initial, arch, images, **kwargs)
    reference = official_phi()
    official = probe_phi(reference, arch, images, **kwargs) if reference is not None else None
    change = function_change(start, final)
    learned = bool(change >= threshold)
    scale, scale_init, spread = final.scale_mean, start.scale_mean, final.scale_channel_std
    official_scale = official.scale_mean if official is not None else None
    sites = []
    for i, name in enumerate(final.site_names):
        row = {"site": name, "channels": int(final.scales[i].size),
               "scale": float(scale[i]), "scale_init": float(scale_init[i]), "scale_channel_std": float(spread[i]),
               "multiplier_mean": float(final.multiplier_mean[i]),
               "multiplier_mean_init": float(start.multiplier_mean[i]),
               "multiplier_std": float(final.multiplier_std[i]), "multiplier_std_init": float(start.multiplier_std[i])}
        if official_scale is not None:
            row["scale_official"] = float(official_scale[i])
        sites.append(row)
    return {
        "learned": learned,
        "verdict": "learned" if learned else "unchanged",
        "message": verdict_text(learned, change, threshold),
        "function_change": change,
        "threshold": threshold,
        "scale_site_range": float(scale.max() - scale.min()),
        "scale_channel_std_mean": float(spread.mean()),
        "distance_from_init": parameter_distance(phi, initial),
        "distance_from_official": parameter_distance(phi, reference) if reference is not None else None,
        "probe": {"arch": arch, "images": int(images.shape[0]), "image_size": int(image_size), "seed": int(seed),
                  "mode": "fresh network, training mode (batch statistics), noise coefficient 1, no clip"},
        "sites": sites,
    }


__all__ = ["DIAGNOSTICS_RECORD", "LEARNED_THRESHOLD", "PhiProbe", "UNLEARNED_NOTE", "diagnose", "function_change",
           "official_phi", "parameter_distance", "probe_phi", "trained_by", "verdict_text"]
