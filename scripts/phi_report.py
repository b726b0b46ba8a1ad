"""Markdown tables of whether our phi learned and whether it transfers (the numbers behind docs/results.md,
"A phi of our own").

    .venv/bin/python scripts/phi_report.py --artifacts ROOT --phi RUN STUDY [STUDY ...]

RUN: the meta-training result (a meta_select or meta_train run id); STUDY: ``02_transfer_study`` study ids whose
finished runs are pooled (a grid run as one study per target, say). Prints: the meta-training runs' diagnostics;
for every architecture and target, Base's training accuracy, test accuracy and gap; the mean ± standard error over
seeds of accuracy, NLL and ECE per method; the differences paired by seed to Base and to the untrained-phi control,
with ``*`` where a difference is more than two standard errors from 0.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench.artifacts import RunStore  # noqa: E402
from workbench.labels import CONTROL_METHOD  # noqa: E402
from workbench.study import find_study, paired_differences, regime_table, study_runs  # noqa: E402

METRICS = {"test_accuracy": ("accuracy (%)", 100, 1), "test_nll": ("NLL", 1, 3), "test_ece": ("ECE (%)", 100, 1)}


def meta_section(store: RunStore, run_id: str) -> list[str]:
    record = store.run_record(run_id)
    runs = record.summary.get("run_ids") or [run_id]
    lines = ["### Meta-training runs", "",
             "| run | seed | held-out acc. (chance) | function change | learned | scale per site | authors' phi, same probe |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for rid in runs:
        run = store.open_run(rid)
        s, d = run.summary, run.load_json("phi_diagnostics")
        scales = ", ".join(f"{row['scale']:.3f}" for row in d["sites"])
        official = ", ".join(f"{row['scale_official']:.3f}" for row in d["sites"] if "scale_official" in row)
        lines.append(f"| `{rid}` | {s['seed']} | {100 * s['heldout_acc_mean']:.1f}% ({100 * s['chance']:.1f}%) | "
                     f"{d['function_change']:.3f} | {d['learned']} | {scales} | {official} |")
    if record.kind == "meta_select":
        lines += ["", f"Selection: {record.summary.get('reason')}"]
    return lines + [""]


def _fmt(value: float, scale: float, digits: int) -> str:
    return f"{value * scale:.{digits}f}"


def tables(runs: pd.DataFrame) -> list[str]:
    lines = ["### Does Base overfit? (Base's final network on its training images, up to train_eval_examples of them, "
             "and on the test split)", "",
             "| arch | target | seeds | train acc. (%) | test acc. (%) | gap (points) | regime |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in regime_table(runs).itertuples():
        lines.append(f"| {row.arch} | {row.target} | {row.seeds} | {100 * row.train_accuracy:.1f} | "
                     f"{100 * row.test_accuracy:.1f} | {100 * row.gap:.1f} | {row.regime} |")
    lines.append("")
    for metric, (name, scale, digits) in METRICS.items():
        data = runs.assign(value=pd.to_numeric(runs[metric], errors="coerce"))
        agg = data.groupby(["arch", "target", "label"], sort=True)["value"].agg(["mean", "std", "count"]).reset_index()
        lines += [f"### {name}: mean ± standard error over seeds", "", "| arch | target | method | " + name + " | n |",
                  "| --- | --- | --- | --- | --- |"]
        for row in agg.itertuples():
            se = row.std / row.count ** 0.5 if row.count > 1 else float("nan")
            lines.append(f"| {row.arch} | {row.target} | {row.label} | {_fmt(row.mean, scale, digits)} ± "
                         f"{_fmt(se, scale, digits)} | {row.count} |")
        lines.append("")
        for reference, title in (("base", "Base"), (CONTROL_METHOD, "the untrained-phi control")):
            paired = paired_differences(runs, metric, reference=reference)
            if paired.empty:
                continue
            lines += [f"#### {name}: difference to {title}, paired by seed (mean ± s.e.; * beyond 2 s.e.)", "",
                      "| arch | target | method | difference | n |", "| --- | --- | --- | --- | --- |"]
            for row in paired.itertuples():
                mark = " *" if row.beyond_2se else ""
                lines.append(f"| {row.arch} | {row.target} | {row.label} | {row.mean_diff * scale:+.{digits}f} ± "
                             f"{_fmt(row.se, scale, digits)}{mark} | {row.n} |")
            lines.append("")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifacts", type=Path, required=True, help="artifacts root holding the runs and studies")
    parser.add_argument("--phi", required=True, help="the meta-training result (meta_select or meta_train run id)")
    parser.add_argument("studies", nargs="+", help="02_transfer_study study ids")
    args = parser.parse_args(argv)
    store = RunStore(args.artifacts)
    runs = pd.concat([study_runs(store, find_study(store, sid)) for sid in args.studies], ignore_index=True)
    print("\n".join(meta_section(store, args.phi) + tables(runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
