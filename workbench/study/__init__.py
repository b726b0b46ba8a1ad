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

The package's parts: ``configs`` (the typed configs, notebooks and profiles), ``session`` (a notebook's link to its
study), ``grid`` (02's transfer grid, fanned out), ``runner`` (papermill execution, resume) and ``cli``. The
notebooks' readers and tables are the results layer's (:mod:`workbench.results`), re-exported here.
"""
from ..errors import StudyError
from ..results import (TRANSFER_NOTEBOOK, MetaHistory, ScaleData, describe_meta, find_study, meta_history, method_label,
                       paired_differences, regime_table, reliability_groups, robustness_table, scale_data, study_runs,
                       summarize, wide)
from .cli import register_cli
from .configs import (ARTIFACTS_ENV, EXPLORE_STATISTICS, INTERACTIVE_PROFILE, LATEST, NOTEBOOKS_DIR, OFFICIAL,
                      PROFILES_DIR, PROGRESS_ENV, REGIME_CHECKS, REPO, REPORT_KIND, STUDY_ENV,
                      CalibrationStudyConfig, ExploreConfig, ParameterError, ScalesStudyConfig,
                      TransferStudyConfig, available_notebooks, available_profiles, config_class, config_path,
                      load_profile, notebook_config, notebook_config_class, parameters_source, profile_path,
                      read_profile, resolve_notebook)
from .grid import (cell_run_id, estimated_grid_seconds, grid_cells, latest_phi_run, limit_test, resolve_study_phi,
                   run_transfer_grid, transfer_cell, underfit_message)
from .runner import (PreparedStudy, StudyOutcome, execute_study, prepare_studies, resume_study, run_studies,
                     tidy_outputs)
from .session import StudyRunStore, StudySession, open_session, save_report

__all__ = [
    "CalibrationStudyConfig", "EXPLORE_STATISTICS", "ExploreConfig", "MetaHistory", "ParameterError",
    "PreparedStudy", "ScaleData", "ScalesStudyConfig", "StudyError", "StudyOutcome", "StudyRunStore",
    "StudySession", "TransferStudyConfig", "available_notebooks", "available_profiles", "cell_run_id",
    "config_class", "config_path", "describe_meta", "estimated_grid_seconds", "execute_study", "find_study",
    "grid_cells", "latest_phi_run", "limit_test", "load_profile", "meta_history", "method_label",
    "notebook_config", "notebook_config_class", "open_session", "paired_differences", "parameters_source",
    "prepare_studies", "read_profile", "regime_table", "register_cli", "reliability_groups", "resolve_notebook",
    "resolve_study_phi", "resume_study", "robustness_table", "run_studies", "run_transfer_grid", "save_report",
    "scale_data", "study_runs", "summarize", "tidy_outputs", "transfer_cell", "underfit_message", "wide",
]
