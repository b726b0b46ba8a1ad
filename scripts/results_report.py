"""Tables and provenance of a finished results study, as Markdown (the numbers behind docs/results.md).

    .venv/bin/python scripts/results_report.py [--artifacts artifacts/results] [--study latest [--study ID ...]] \
        [--command "workbench study run ..."] [--out docs/results-tables.md] [--provenance]

Reads the transfer studies named by ``--study`` (default: the newest finished; several are pooled, e.g. one study
per architecture and target run side by side) and the newest finished study of each other notebook (01
meta-train, 03 calibration/robustness, 04 scales) under the artifacts root, and prints: where the numbers come
from (studies, git revision, wall time), whether Base overfits each cell (its training-set accuracy and gap),
accuracy, NLL and ECE as mean ± std over seeds, the differences to Base paired by seed with their standard
errors, which cells the authors' phi wins by the results study's criterion, robustness under PGD and the
per-layer scale profile. ``--provenance`` also writes ``provenance.json`` into the artifacts root
(temporary file, then rename), which is what a shipped results folder carries.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.artifacts import RunStore, atomic_write_text  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.results import (LATEST, TRANSFER_NOTEBOOK, find_study, paired_differences,  # noqa: E402
                               regime_table, robustness_table, scale_data, study_runs, summarize)

NOTEBOOKS = ("01_meta_train", "02_transfer_study", "03_calibration_robustness", "04_scales")
METHOD_ORDER = ["base", "dropblock", "manifold_mixup", "information_dropout", "mixup", "metaperturb (authors' phi)",
                "metaperturb (ours", "metaperturb (untrained control)"]
AUTHORS = "metaperturb (authors' phi)"


def _time(stamp: str | None) -> datetime | None:
    return datetime.fromisoformat(stamp) if stamp else None


def _studies(store: RunStore, transfer: list[str]) -> list:
    """The studies the report rests on: the transfer studies and the newest finished study of each other notebook."""
    chosen = [find_study(store, spec, TRANSFER_NOTEBOOK) for spec in transfer]
    for notebook in NOTEBOOKS:
        if notebook == TRANSFER_NOTEBOOK:
            continue
        try:
            chosen.append(find_study(store, LATEST, notebook))
        except WorkbenchError:
            continue
    return chosen


def provenance(studies: list, command: str | None) -> dict:
    rows, starts, ends = [], [], []
    for record in studies:
        start, end = _time(record.created), _time(record.finished)
        starts.append(start)
        ends.append(end)
        env = record.environment or {}
        rows.append({"study_id": record.study_id, "notebook": record.notebook, "profile": record.profile,
                     "started": record.created, "finished": record.finished,
                     "minutes": round((end - start).total_seconds() / 60, 1) if start and end else None,
                     "git_revision": record.git_revision, "git_dirty": record.git_dirty,
                     "runs": len(record.run_ids), "torch": env.get("torch"), "cpu": env.get("cpu"),
                     "cpu_count": env.get("cpu_count"), "cuda": env.get("cuda_available")})
    total = (max(ends) - min(starts)).total_seconds() / 60 if studies and all(starts + ends) else None
    return {"command": command, "studies": rows, "wall_minutes": round(total, 1) if total else None,
            "note": "network weights (checkpoints/) are not shipped; metrics, curves, calibration bins, "
                    "predictions, robustness curves, scales and phi are"}


def _ordered(frame, column: str = "method"):
    def rank(label: str) -> int:
        return next((i for i, m in enumerate(METHOD_ORDER) if label == m or label.startswith(m)), len(METHOD_ORDER))

    return frame.assign(_rank=frame[column].map(rank)).sort_values(["_rank", column]).drop(columns="_rank")


def _cell(mean: float, se: float, scale: float, digits: int) -> str:
    flag = " **(>2 se)**" if se == se and se > 0 and abs(mean) > 2 * se else ""
    return f"{scale * mean:+.{digits}f} ± {scale * se:.{digits}f}{flag}"


def regime_markdown(runs) -> str:
    table = regime_table(runs)
    lines = ["| arch | target | seeds | Base train % | Base test % | gap (points) | regime |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.arch} | {r.target} | {r.seeds} | {100 * r.train_accuracy:.1f} | "
                     f"{100 * r.test_accuracy:.1f} | {100 * r.gap:.1f} | {r.regime} |")
    return "\n".join(lines)


def paired_markdown(runs, metric: str, scale: float, digits: int, reference: str = "base",
                    only=lambda label: True) -> str:
    """Methods x (arch / target): mean over seeds of (method - same-seed reference) ± its standard error, for the
    method labels that ``only`` keeps."""
    table = paired_differences(runs, metric, reference=reference)
    table = table[[bool(only(label)) for label in table["label"]]]
    if table.empty:
        return f"_no pairs with {reference}_"
    cols = sorted({(a, t) for a, t in zip(table["arch"], table["target"])})
    lines = ["| method | " + " | ".join(f"{a} / {t}" for a, t in cols) + " |", "|---|" + "---|" * len(cols)]
    for label, part in _ordered(table.rename(columns={"label": "method"})).groupby("method", sort=False):
        cells = []
        for a, t in cols:
            row = part[(part["arch"] == a) & (part["target"] == t)]
            cells.append(_cell(row["mean_diff"].iloc[0], row["se"].iloc[0], scale, digits) if not row.empty else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wins(runs, label: str = AUTHORS):
    """Per (arch, target): the paired differences of ``label`` to Base and whether it wins by the results study's
    criterion: accuracy up or NLL down by more than two standard errors, with a lower ECE."""
    import pandas as pd

    merged = None
    for metric, short in (("test_accuracy", "acc"), ("test_nll", "nll"), ("test_ece", "ece")):
        part = paired_differences(runs, metric)
        part = part[part["label"] == label][["arch", "target", "mean_diff", "se", "n"]]
        part = part.rename(columns={"mean_diff": f"{short}_diff", "se": f"{short}_se"})
        merged = part if merged is None else merged.merge(part.drop(columns="n"), on=["arch", "target"])
    if merged is None or merged.empty:
        return pd.DataFrame()
    merged["acc_up"] = merged["acc_diff"] > 2 * merged["acc_se"]
    merged["nll_down"] = -merged["nll_diff"] > 2 * merged["nll_se"]
    merged["wins"] = (merged["acc_up"] | merged["nll_down"]) & (merged["ece_diff"] < 0)
    return merged.reset_index(drop=True)


def wins_markdown(runs, regime) -> str:
    table = wins(runs)
    if table.empty:
        return "_the authors' phi is not in this study_"
    gap = {(r.arch, r.target): r.regime for r in regime.itertuples()}
    lines = ["| arch | target | accuracy (points) | NLL | ECE (points) | wins | Base's regime |",
             "|---|---|---|---|---|---|---|"]
    for r in table.itertuples():
        lines.append(f"| {r.arch} | {r.target} | {_cell(r.acc_diff, r.acc_se, 100, 1)} | "
                     f"{_cell(r.nll_diff, r.nll_se, 1, 3)} | {_cell(r.ece_diff, r.ece_se, 100, 1)} | "
                     f"{'**yes**' if r.wins else 'no'} | {gap.get((r.arch, r.target), '?')} |")
    for arch, part in table.groupby("arch"):
        lines.append(f"\n{arch}: the authors' phi wins on {int(part['wins'].sum())} of {len(part)} targets "
                     f"({', '.join(part[part['wins']]['target']) or 'none'}).")
    return "\n".join(lines)


def metric_tables(runs, metric: str, scale: float, digits: int) -> tuple[str, str]:
    """(mean ± std table, difference-to-Base table) as Markdown, methods x arch / target."""
    table = summarize(runs, metric)
    cols = sorted({(a, t) for a, t in zip(table["arch"], table["target"])})
    head = "| method | " + " | ".join(f"{a} / {t}" for a, t in cols) + " |"
    rule = "|---|" + "---|" * len(cols)
    values, deltas = [head, rule], [head, rule]
    for method, part in _ordered(table).groupby("method", sort=False):
        cells, dcells = [], []
        for a, t in cols:
            row = part[(part["arch"] == a) & (part["target"] == t)]
            if row.empty:
                cells.append("")
                dcells.append("")
                continue
            r = row.iloc[0]
            cells.append(f"{scale * r['mean']:.{digits}f} ± {scale * r['std']:.{digits}f}")
            if r["delta_base"] == r["delta_base"]:  # not NaN
                d, se = scale * r["delta_base"], scale * r["delta_base_se"]
                flag = " (>2 se)" if se > 0 and abs(d) > 2 * se else ""
                dcells.append(f"{d:+.{digits}f} ± {se:.{digits}f}{flag}")
            else:
                dcells.append("—")
        values.append(f"| {method} | " + " | ".join(cells) + " |")
        deltas.append(f"| {method} | " + " | ".join(dcells) + " |")
    return "\n".join(values), "\n".join(deltas)


def robustness_markdown(store: RunStore, runs) -> str:
    table = robustness_table(store, runs)
    if table.empty:
        return "_no robustness curves in this study_"
    lines = []
    for (arch, target, norm), part in table.groupby(["arch", "target", "norm"], sort=True):
        eps = sorted(part["eps"].unique())
        lines.append(f"**{arch} / {target}, PGD {norm}** (accuracy %, mean ± std over seeds; eps in [0, 1] pixels)\n")
        lines.append("| method | " + " | ".join("clean" if e == 0 else f"eps {e:.4f}" for e in eps) + " |")
        lines.append("|---|" + "---|" * len(eps))
        for method, rows in _ordered(part.rename(columns={"label": "method"})).groupby("method", sort=False):
            cells = []
            for e in eps:
                r = rows[rows["eps"] == e]
                cells.append(f"{100 * r['mean'].iloc[0]:.1f} ± {100 * r['std'].iloc[0]:.1f}" if not r.empty else "")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def scales_markdown(store: RunStore, runs) -> str:
    data = scale_data(store, runs)
    profile = data.profile
    if profile is None or len(profile) == 0:
        return "_no scale arrays in this study_"
    lines = []
    for (arch, label), part in profile.groupby(["arch", "label"], sort=True):
        part = part.sort_values("site_index")
        targets = sorted(part["target"].unique())
        lines.append(f"**{arch}, {label}**: mean per-channel scale at each site, by target (mean over seeds)\n")
        sites = sorted(part["site_index"].unique())
        lines.append("| target | " + " | ".join(f"site {i + 1}" for i in sites) + " |")
        lines.append("|---|" + "---|" * len(sites))
        for target in targets:
            rows = part[part["target"] == target].set_index("site_index")
            lines.append(f"| {target} | " + " | ".join(f"{rows.loc[i, 'mean']:.3f}" if i in rows.index else ""
                                                    for i in sites) + " |")
        lines.append("")
    return "\n".join(lines)


def report(root: Path, transfer: str | list[str], command: str | None, write_provenance: bool) -> str:
    import pandas as pd

    store = RunStore(root)
    specs = [transfer] if isinstance(transfer, str) else list(transfer)
    try:
        studies = _studies(store, specs)
    except WorkbenchError as exc:
        raise WorkbenchError(f"{exc} (run the results profile first)") from exc
    prov = provenance(studies, command)
    if write_provenance:
        atomic_write_text(root / "provenance.json", json.dumps(prov, indent=2) + "\n")
    runs = pd.concat([study_runs(store, s) for s in studies[:len(specs)]], ignore_index=True)
    out = ["## Provenance\n"]
    if command:
        out.append(f"Command: `{command}`\n")
    out.append("| study | notebook | started (UTC) | minutes | runs | git revision |")
    out.append("|---|---|---|---|---|---|")
    for s in prov["studies"]:
        rev = (s["git_revision"] or "?")[:10] + (" (dirty)" if s["git_dirty"] else "")
        out.append(f"| {s['study_id']} | {Path(s['notebook'] or '?').stem} | {(s['started'] or '')[:19]} | "
                   f"{s['minutes']} | {s['runs']} | {rev} |")
    out.append(f"\nWall time, first start to last finish: {prov['wall_minutes']} minutes.\n")
    n_seeds = runs.groupby(["arch", "target", "label"])["seed"].nunique()
    seeds = f"{n_seeds.min()}" if n_seeds.min() == n_seeds.max() else f"{n_seeds.min()}-{n_seeds.max()}"
    out.append(f"Transfer runs: {len(runs)} finished (targets: {runs['target'].nunique()}, architectures: "
               f"{runs['arch'].nunique()}, methods: {runs['label'].nunique()}; {seeds} seeds each).\n")
    regime = regime_table(runs)
    out.append("## Does Base overfit? (the regime gate)\n\nBase's final network on a fixed set of 1,000 of its "
               "training images (all of them when fewer) and on the test split, means over seeds. Under a 5-point "
               "gap a cell is marked underfit: a regularizer cannot help there.\n\n" + regime_markdown(runs) + "\n")
    out.append("## Where the authors' phi beats Base\n\nDifferences to Base paired by seed (± standard error). "
               "It wins a cell when accuracy rises or NLL falls by more than two standard errors, with a lower "
               "ECE.\n\n" + wins_markdown(runs, regime) + "\n")
    for metric, name, scale, digits in (("test_accuracy", "Test accuracy (%)", 100, 1),
                                        ("test_nll", "Test NLL", 1, 3),
                                        ("test_ece", "Expected calibration error (%, 15 bins)", 100, 1),
                                        ("train_eval_accuracy", "Training-set accuracy of the final network (%)",
                                         100, 1)):
        values, _ = metric_tables(runs, metric, scale, digits)
        out.append(f"## {name}, mean ± std over seeds\n\n{values}\n")
        if metric != "train_eval_accuracy":
            out.append(f"### {name}: difference to Base paired by seed (± standard error; **(>2 se)** where "
                       f"|difference| > 2 se)\n\n{paired_markdown(runs, metric, scale, digits)}\n")
    control = "metaperturb (untrained control)"
    if (runs["label"] == control).any():
        out.append("## Our phi against its untrained control (what meta-learning added)\n\nOur phi minus the "
                   "phi its meta-training started from, paired by seed; the authors' phi against the same "
                   "control for scale.\n")
        for metric, name, scale, digits in (("test_accuracy", "accuracy (points)", 100, 1),
                                            ("test_nll", "NLL", 1, 3), ("test_ece", "ECE (points)", 100, 1)):
            table = paired_markdown(runs, metric, scale, digits, reference=control,
                                    only=lambda label: label.startswith("metaperturb ("))
            out.append(f"**{name}**\n\n{table}\n")
    out.append("## Robustness\n\n" + robustness_markdown(store, runs))
    out.append("## Per-layer perturbation scales\n\n" + scales_markdown(store, runs))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", default="artifacts/results", help="artifacts root of the study")
    parser.add_argument("--study", action="append", default=None,
                        help="transfer study id, repeatable: the runs of all are pooled (default: the newest finished)")
    parser.add_argument("--command", default=None, help="the command that produced the study, for the record")
    parser.add_argument("--out", default=None, help="write the Markdown here (temporary file, then rename)")
    parser.add_argument("--provenance", action="store_true", help="also write provenance.json into the root")
    args = parser.parse_args(argv)
    try:
        text = report(Path(args.artifacts), args.study or [LATEST], args.command, args.provenance)
    except WorkbenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.out:
        atomic_write_text(Path(args.out), text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
