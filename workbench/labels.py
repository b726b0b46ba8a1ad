"""One name for every method row, wherever it is shown (notebooks, reports, the dashboard).

A MetaPerturb row says which phi it used:

- ``metaperturb (authors' phi)``: the released ``perturb_750.pth`` (``phi = official``);
- ``metaperturb (ours: …<run>)``: a phi meta-trained by the workbench, named by the random suffix that ends its run
  id (or the end of its file name);
  ``metaperturb (ours, did not learn: …<run>)`` when that run's diagnostics say its function stayed at the
  initialisation (:mod:`workbench.phi_diagnostics`), so an untrained phi is never shown silently as ours;
- ``metaperturb (untrained control)``: ``metaperturb_untrained``, the phi a run started from.

Other methods are shown by their registered name.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Optional

from .errors import WorkbenchError
from .phi_diagnostics import DIAGNOSTICS_RECORD, UNLEARNED_NOTE, trained_by

OFFICIAL = "official"
CONTROL_METHOD = "metaperturb_untrained"
AUTHORS = "authors' phi"
CONTROL = "untrained control"
_TAIL = 4  # characters of a run id kept in a label: its random suffix (as the dashboard's run pickers show it)


def _missing(value: Any) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def short_id(run_id: str) -> str:
    """A run id as rows and menus show it: ``…`` and the random suffix that ends it (short ids stay whole)."""
    return run_id if len(run_id) <= _TAIL + 1 else "…" + run_id[-_TAIL:]


def method_label(method: Any, phi: Any = None, learned: Optional[bool] = None) -> str:
    """The row name of a run of ``method`` with phi tag ``phi`` (``learned``: that phi's verdict, None if unknown)."""
    name = "?" if _missing(method) else str(method)
    if name == CONTROL_METHOD:
        return f"metaperturb ({CONTROL})"
    if _missing(phi):
        return name
    phi = str(phi)
    if phi == OFFICIAL:
        return f"{name} ({AUTHORS})"
    tail = short_id(phi)
    if learned is False:
        return f"{name} (ours, {UNLEARNED_NOTE}: {tail})"
    return f"{name} (ours: {tail})"


def phi_verdict(store: Any, phi: Any) -> Optional[dict[str, Any]]:
    """The diagnostics record of the meta-training run a phi tag names (a ``meta_select`` run: its chosen run), or
    None for the authors' phi, a file, or a run that has no record (made before the diagnostics existed)."""
    if _missing(phi) or str(phi) == OFFICIAL:
        return None
    run_dir = store.runs_dir / str(phi)
    if "/" in str(phi) or not (run_dir / "run.json").is_file():
        return None
    try:
        trained = trained_by(store, str(phi))
        if trained is None:
            return None
        # through the store's checked readers: a record that leads outside the root, or a corrupt run, is not read
        run = store.open_run(trained)
        if DIAGNOSTICS_RECORD not in run.list_json():
            return None
        value = run.load_json(DIAGNOSTICS_RECORD)
    except (WorkbenchError, OSError):  # a corrupt run is the store's to report; the label says nothing about it
        return None
    return value if isinstance(value, dict) and isinstance(value.get("learned"), bool) else None


def phi_learned(store: Any, phis: Iterable[Any]) -> dict[str, Optional[bool]]:
    """``{phi tag: learned}`` for the distinct tags (None where unknown)."""
    out: dict[str, Optional[bool]] = {}
    for phi in phis:
        if _missing(phi) or str(phi) in out:
            continue
        record = phi_verdict(store, phi)
        out[str(phi)] = None if record is None else bool(record["learned"])
    return out


def labels_for(store: Any, methods: Iterable[Any], phis: Iterable[Any]) -> list[str]:
    """:func:`method_label` of every (method, phi) pair, each phi's verdict read once from ``store``."""
    methods, phis = list(methods), list(phis)
    verdicts: Mapping[str, Optional[bool]] = phi_learned(store, phis)
    return [method_label(m, p, None if _missing(p) else verdicts.get(str(p))) for m, p in zip(methods, phis)]


__all__ = ["AUTHORS", "CONTROL", "CONTROL_METHOD", "labels_for", "method_label", "phi_learned", "phi_verdict"]
