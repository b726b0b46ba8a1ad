"""One name for every method row, wherever it is shown (notebooks, reports, the dashboard).

The labelling lives in the results layer, :mod:`workbench.results` (:func:`~workbench.results.method_label`, the row
name of a (method, phi) pair, and :func:`~workbench.results.labels_for`, which every table and page applies to its
runs); this module keeps the names importable from here. The labels:

- ``metaperturb (authors' phi)``: the released ``perturb_750.pth`` (``phi = official``);
- ``metaperturb (ours: …<run>)``: a phi meta-trained by the workbench, named by the random suffix that ends its run
  id (or the end of its file name);
  ``metaperturb (ours, did not learn: …<run>)`` when that run's diagnostics say its function stayed at the
  initialisation (:mod:`workbench.phi_diagnostics`), so an untrained phi is never shown silently as ours;
- ``metaperturb (untrained control)``: ``metaperturb_untrained``, the phi a run started from.

Other methods are shown by their registered name.
"""
from __future__ import annotations

from .results import (AUTHORS, CONTROL, CONTROL_METHOD, OFFICIAL, labels_for, method_label, phi_learned, phi_tag,
                      phi_verdict, short_id)

__all__ = ["AUTHORS", "CONTROL", "CONTROL_METHOD", "OFFICIAL", "labels_for", "method_label", "phi_learned",
           "phi_tag", "phi_verdict", "short_id"]
