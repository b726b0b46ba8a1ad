"""``workbench meta-train`` and ``workbench phi-check``."""
from __future__ import annotations

import argparse

from ..artifacts import RunStore
from ..cli import add_artifacts_flag, add_command, add_run_flags
from ..config import parse_overrides
from .config import MetaTrainConfig, RESUME_KINDS
from .runs import diagnose_run
from .api import meta_train
from .runs import _locate_run, _stored_config


# ==================================================================================================== CLI
def _cli(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    if args.artifacts:
        overrides["artifacts_root"] = args.artifacts
    store = RunStore(args.artifacts) if args.artifacts else None
    if args.resume:
        store, run_id = _locate_run(args.resume, store, overrides)
        store.check_resume_kind(run_id, RESUME_KINDS, "a meta-train run")  # a transfer run is sent to its command
        stored = _stored_config(store, run_id)
        if args.config:
            config = MetaTrainConfig.from_yaml(args.config, **overrides)
        else:
            # keep the stored values; an override that changes a computed field is refused by the resume check
            config = MetaTrainConfig.from_dict({**stored, **overrides})
        result = meta_train(config, store=store, progress=not args.no_progress, resume=run_id)
    else:
        config = (MetaTrainConfig.from_yaml(args.config, **overrides) if args.config
                  else MetaTrainConfig.from_dict(overrides))
        result = meta_train(config, store=store, progress=not args.no_progress)
    if result.phi_path is not None:  # rank 0
        where = f"selection run {result.selection_run_id}, chosen run {result.run_id}" if result.selection_run_id \
            else f"run {result.run_id}"
        extra = (f"; {result.summary['reason']}" if result.selection else
                 f"; mean held-out accuracy {result.summary['heldout_acc_mean']:.4f}")
        print(f"meta-training finished ({where}); phi saved to {result.phi_path}{extra}")
    return 0


def _cli_check(args: argparse.Namespace) -> int:
    store = RunStore(args.artifacts) if args.artifacts else None
    record = diagnose_run(args.run, store)
    sites = ", ".join(f"{row['scale']:.3f}" for row in record["sites"])
    print(f"run {record['run_id']}: phi {record['message']}; mean scale per site {sites}")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``workbench meta-train`` and ``workbench phi-check``."""
    parser = add_command(
        subparsers, "meta-train", _cli, help="meta-train phi over source tasks (one process, or many under torchrun)",
        description="Meta-train the MetaPerturb perturbation function phi jointly over tasks cut from a source "
                    "dataset. Run many processes with `torchrun --nproc_per_node=N -m workbench meta-train ...`.")
    add_run_flags(parser, "MetaTrainConfig", config_file=" (see configs/meta_train_default.yaml)")
    check = add_command(
        subparsers, "phi-check", _cli_check,
        help="say whether a meta-training run's phi learned (writes its diagnostics record)",
        description="Probe a finished meta-training run's phi against the phi it started from (a fresh network of "
                    "its architecture, held-out source images, fixed noise) and write records/phi_diagnostics.json, "
                    "which the notebooks and the dashboard read. Runs write it themselves since it exists; this "
                    "command checks older ones.")
    check.add_argument("run", metavar="RUN", help="a meta_train or meta_select run id (or run folder)")
    add_artifacts_flag(check)
