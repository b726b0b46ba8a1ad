"""``workbench study run``, ``workbench study resume`` and ``workbench study list``."""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import yaml

from ..artifacts import RunStore, to_jsonable
from ..errors import WorkbenchError
from .configs import available_notebooks, available_profiles, notebook_config_class, resolve_notebook
from .runner import resume_study, run_studies


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
    from ..fanout import EXECUTORS, RAY_ADDRESS_ENV

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


def add_notebook_flags(parser: argparse.ArgumentParser, profile_help: str, profile_default: str | None = None) -> None:
    """The flags of every command that executes study notebooks: ``--profile``, ``-p KEY VALUE``, ``--artifacts``
    and ``--quiet``."""
    from ..cli import add_artifacts_flag

    parser.add_argument("--profile", required=profile_default is None, default=profile_default, help=profile_help)
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("KEY", "VALUE"),
                        help="override a parameter (VALUE is YAML: 10, 1e-3, [a, b], null); KEY or NOTEBOOK.KEY")
    add_artifacts_flag(parser)
    parser.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output and progress")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add ``workbench study run``, ``workbench study resume`` and ``workbench study list``."""
    from ..cli import add_artifacts_flag, add_command

    parser = add_command(
        subparsers, "study", None, help="run the study notebooks headless (papermill) and list studies",
        description="Execute the notebooks of notebooks/ with a parameter profile; each notebook becomes a study "
                    "in <artifacts>/studies/<study id>/ with its executed notebook and the runs it made.")
    sub = parser.add_subparsers(dest="study_command", metavar="ACTION")
    run = add_command(
        sub, "run", _cli_run, help="execute notebooks with a profile",
        description="Validate every notebook's parameters, then execute the notebooks one after another, each as "
                    "its own study; stops at the first failure (exit 1). A bad parameter exits 2 before anything "
                    f"runs. Notebooks: {', '.join(available_notebooks()) or 'none found'} (a number such as 02 "
                    f"works). Profiles: {', '.join(available_profiles()) or 'none found'} (or a YAML file).")
    run.add_argument("notebooks", nargs="+", metavar="NOTEBOOK", help="notebook path, name or number")
    add_notebook_flags(run, "profile name (notebooks/profiles/NAME.yaml) or YAML file")
    _add_execution_flags(run)
    resume = add_command(
        sub, "resume", _cli_resume, help="continue an interrupted or failed study",
        description="Execute a study's notebook again in the same study, with its parameters: grid cells it "
                    "finished are kept, the others resume from their checkpoints or start again. Only the fan-out "
                    "settings may change.")
    resume.add_argument("study", metavar="STUDY", help="the study id (`workbench study list`)")
    add_artifacts_flag(resume)
    resume.add_argument("--quiet", action="store_true", help="do not stream the notebook's output and progress")
    _add_execution_flags(resume)
    listing = add_command(sub, "list", _cli_list, help="list the studies of an artifacts root")
    add_artifacts_flag(listing)
    listing.add_argument("--json", action="store_true", help="JSON instead of a table")
