"""Generate the study notebooks from this file, so they are reviewed as code.

    .venv/bin/python notebooks/_build.py           # (re)write notebooks/0*.ipynb
    .venv/bin/python notebooks/_build.py --check   # exit 1 if a committed notebook differs from what this writes

Every notebook has the same head: an introduction, a setup cell that imports and snapshots ``globals()``, the
cell tagged ``parameters`` (generated from the notebook's typed config: exactly its fields, with their
defaults), and a validation cell (``workbench.study.notebook_config``) that refuses unknown or ill-typed
parameters, even under plain papermill. After that come thin cells that call ``workbench`` and show plotly figures.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from workbench.meta_train import MetaTrainConfig  # noqa: E402
from workbench.study import (CalibrationStudyConfig, ExploreConfig, ScalesStudyConfig,  # noqa: E402
                             TransferStudyConfig, config_path, parameters_source)

FILTER_NOTE = ("The controls above the figures filter them by target, architecture, method, seed (or run) among "
               "the runs already made; nothing is re-run. Executed headless (papermill), the figures are the "
               "unfiltered ones.")

RUNNING = """
**Run it in JupyterLab** (`make lab`, then open this notebook): the parameters cell holds the defaults of
`{config}`{defaults_note}. To step through with a profile's budget instead, uncomment the
`load_profile` line of the cell after the parameters and *Run All*. Each run of the notebook is a study of profile
`interactive` in the artifacts root (`$WORKBENCH_ARTIFACTS`, else the checkout's `artifacts/`).

**Run it headless**: `workbench study run {name} --profile demo` (or `smoke`, `paper`, `results`; override with
`-p KEY VALUE`, e.g. `-p {example}`). The executed notebook is saved in `artifacts/studies/<study id>/` with the
parameters, versions and git revision; `workbench study list` shows the studies. Plain
`papermill notebooks/{name}.ipynb out.ipynb -p KEY VALUE` works too, with the same validation.

An unknown or ill-typed parameter stops the notebook at the validation cell with one line, e.g.
`ParameterError: unknown {config_name} parameter(s) ['bogus']; valid names are: ...` or
`ParameterError: {type_error}`.
"""


def filtered_panel(name: str, figure: str, *fields: str) -> str:
    """A cell showing ``figure`` (a call ending in ``**selection``) under controls filtering ``runs`` by ``fields``."""
    quoted = ", ".join(f'"{f}"' for f in fields)
    return (f"{name} = controls.show(\n    lambda **selection: {figure},\n"
            f"    **controls.filters(runs, {quoted}))")


def source_report(name: str, tables: str) -> str:
    """The last cell of a notebook that reads a transfer study: its report, tagged with that study."""
    return (f"report = study.save_report(session, \"{name}\", {tables},\n"
            "                          info={\"source_study\": source.study_id}, "
            "tags={\"source_study\": source.study_id})\nsession.finish()")


def header(name: str, title: str, what: str, cls, imports: str, example: str, type_error: str,
           defaults_note: str = "") -> list:
    intro = f"# {title}\n\n{what.strip()}\n" + RUNNING.format(
        config=config_path(cls).replace(":", "."), config_name=cls.__name__, name=name, example=example,
        type_error=type_error, defaults_note=defaults_note)
    setup = (f"# Setup. The snapshot of globals() lets the validation cell tell the parameters (and whatever papermill\n"
             f"# injects after the parameters cell) apart from the names defined here.\n{imports.strip()}\n\n"
             f"_names_before = set(globals())")
    validate = (f"# Interactive use: uncomment to load a profile's parameters instead of the defaults above\n"
                f"# (`workbench study run` and papermill inject theirs after the parameters cell).\n"
                f"# globals().update(study.load_profile(\"demo\", \"{name}\"))\n\n"
                f"config = study.notebook_config({cls.__name__}, globals(), _names_before)\n"
                f"session = study.open_session(\"{name}\", config)\n"
                f"config")
    return [
        new_markdown_cell(intro),
        new_code_cell(setup),
        new_code_cell(parameters_source(cls), metadata={"tags": ["parameters"]}),
        new_code_cell(validate),
    ]


def meta_train_notebook() -> tuple[str, type, list]:
    name = "01_meta_train"
    cells = header(
        name, "01 · Meta-train phi",
        """
Meta-trains the MetaPerturb perturbation function phi jointly over class-disjoint tasks cut from a source dataset
(by default the offline Tiny ImageNet, 32x32), one task network per task, phi shared
(`workbench.meta_train.meta_train`). Then shows the training curves and the **learned scale function over
layers**: the mean per-channel scale phi gives each perturbation site (layer) of the task networks.

The meta-trained phi is what `02_transfer_study` transfers as *our phi* (`phi="latest"` picks the newest finished
meta-training run).
""", MetaTrainConfig,
        "from workbench import plots, results, study\nfrom workbench.meta_train import MetaTrainConfig, meta_train",
        "steps 100", "config field 'steps' must be an integer, got str 'ten'",
        defaults_note=" (the released code's setting: hours on a CPU)")
    cells += [
        new_markdown_cell("## Meta-training\n\nOne progress bar per run (and one per candidate when `num_runs > 1`, "
                          "followed by the selection of the best phi)."),
        new_code_cell("result = meta_train(config, store=session.store)\nprint(results.describe_meta(result))"),
        new_markdown_cell("## Curves\n\nMeans over the tasks of the task networks' train loss/accuracy (perturbed "
                          "training batches) and held-out loss/accuracy (the batches phi's gradient comes from)."),
        new_code_cell("history = results.meta_history(session.store, result)\nplots.meta_curves(history.curves)"),
        new_markdown_cell("## Did phi learn?\n\nA phi whose weights moved can still compute what it computed at its "
                          "initialisation (a scale of about 0.5 everywhere, noise independent of the features): such "
                          "a phi is an untrained phi, not ours. The run probes phi's *function* at the end: a fresh "
                          "network of the source architecture, a fixed batch of held-out source images, the same noise "
                          "for the final phi, its initialisation and the authors' phi; *learned* means some site's mean "
                          "scale or multiplier statistic moved by at least `phi_diagnostics.LEARNED_THRESHOLD`. The "
                          "curves: the task networks against chance, phi's distance from its start and from the "
                          "authors' phi, the meta-gradient's norm and the tasks' agreement on its direction (mean "
                          "pairwise cosine: 0 for unrelated directions), and the spread of the scale over sites and "
                          "channels."),
        new_code_cell("print(f\"phi of run {history.run_id}: {history.verdict}\")\n"
                      "plots.meta_diagnostics(history.curves, history.chance, f\"({history.status})\")"),
        new_code_cell("plots.probe_scales(history.probe_sites())"),
        new_code_cell("history.probe_sites()"),
        new_markdown_cell("## The learned scale function over layers\n\nFor every perturbation site (in forward "
                          "order) the mean of the per-channel scale `s` that phi computes from the site's "
                          "features, averaged over the tasks at the last logged step; error bars are the spread "
                          "over tasks. The dotted line is the standard deviation of the multiplicative noise "
                          "`s * z` the site applies."),
        new_code_cell("plots.scale_by_layer(history.final_sites())"),
        new_code_cell("plots.scale_history(history.sites)"),
        new_code_cell("history.final_sites()"),
        new_markdown_cell("## Selection\n\nWith `num_runs > 1` the best phi is chosen on `select_target` (never on a "
                          "test split)."),
        new_code_cell("history.selection if history.selection else \"one run (num_runs=1): no selection\""),
        new_code_cell("session.finish()"),
    ]
    return name, MetaTrainConfig, cells


def transfer_notebook() -> tuple[str, type, list]:
    name = "02_transfer_study"
    cells = header(
        name, "02 · Transfer study: targets x architectures x methods x seeds",
        """
Trains a fresh network for every cell of a grid of target datasets x architectures x methods x seeds
(`workbench.study.run_transfer_grid`, one `workbench.transfer.transfer` run each): MetaPerturb with **our phi**
(`metaperturb`, phi from `01_meta_train`, or a given run id), MetaPerturb with **the authors' released phi**
(`metaperturb@official`), and the baselines (`base`, `dropblock`, `manifold_mixup`, `information_dropout`, ...).
Then the accuracy table: mean and standard deviation over seeds and the difference to Base with its standard
error; the same for the expected calibration error.

Targets listed in `robust_targets` are also attacked with PGD; `03_calibration_robustness` and `04_scales` read
this study's runs.
""", TransferStudyConfig,
        "from workbench import controls, filters, results, study\nfrom workbench.study import TransferStudyConfig",
        "seeds \"[0, 1]\"", "config field 'steps' must be an integer, got str 'ten'", defaults_note=" (the paper's target recipe: 10,000 steps, 100 MC samples)")
    cells += [
        new_markdown_cell("## The grid\n\nOne run per target x architecture x seed x method, in that order; "
                          "each run's bar shows its steps, the outer bar the runs. The first Base run of each target and "
                          "architecture is the pilot: if it ends underfit, the grid warns (`regime_check='warn'`) or "
                          "stops there (`'stop'`)."),
        new_code_cell("print(f\"{len(study.grid_cells(config))} runs: targets {config.targets}, archs "
                      "{config.archs}, methods {config.methods}, seeds {config.seeds}\")\n"
                      "grid = study.run_transfer_grid(config, session.store)\ngrid"),
        new_markdown_cell("## Accuracy: mean ± std over seeds\n\n`delta_base` is the difference to Base of the "
                          "same architecture and target; `delta_base_se` its standard error "
                          "(`sqrt(sd²/n + sd_base²/n_base)`)."),
        new_markdown_cell("## Does Base overfit here?\n\nA regularizer can only help where Base overfits. Base's "
                          "accuracy on a fixed set of its training images (the final network, as on the test split), "
                          "on the test split, and the gap, means over seeds; a cell whose gap is below "
                          "`results.OVERFIT_GAP` (5 points) is marked underfit."),
        new_code_cell("results.regime_table(grid)"),
        new_code_cell("accuracy = results.summarize(grid, \"test_accuracy\")\nresults.wide(accuracy)"),
        new_code_cell("accuracy"),
        new_markdown_cell(f"{FILTER_NOTE} The metric control switches between accuracy, NLL and ECE; the second "
                          "figure keeps Base whatever the method filter picks, since every method is compared with "
                          "it."),
        new_code_cell("accuracy_panel = controls.show(\n"
                      "    lambda metric, **selection: [filters.metric_figure(grid, metric, **selection),\n"
                      "                                 filters.delta_figure(grid, metric, **selection)],\n"
                      "    metric=controls.dropdown(filters.metric_choices(), \"test_accuracy\", \"metric\"),\n"
                      "    **controls.filters(grid, \"target\", \"arch\", \"method\", \"seed\"))"),
        new_markdown_cell("## Calibration at a glance\n\nExpected calibration error (15 bins) of the final "
                          "Monte-Carlo prediction; `03_calibration_robustness` shows the reliability diagrams."),
        new_code_cell("ece = results.summarize(grid, \"test_ece\")\nresults.wide(ece)"),
        new_markdown_cell("## Paired differences\n\nEach method minus Base of the same seed (same initialisation and "
                          "batches), mean over seeds ± its standard error; `beyond_2se` marks differences of more than "
                          "two standard errors. With the untrained control in the grid, the second table compares our "
                          "phi with it: what meta-learning added beyond the noise."),
        new_code_cell("paired = {metric: results.paired_differences(grid, metric) for metric in (\"test_accuracy\", "
                      "\"test_nll\", \"test_ece\")}\npaired[\"test_nll\"]"),
        new_code_cell("controls = [m for m in config.methods if m == \"metaperturb_untrained\"]\n"
                      "(results.paired_differences(grid, \"test_nll\", reference=controls[0]) if controls else\n"
                      " \"no untrained control in this grid (add metaperturb_untrained to methods)\")"),
        new_code_cell("report = study.save_report(session, \"02_transfer_study\", {\"runs\": grid, \"accuracy\": "
                      "accuracy, \"ece\": ece, \"regime\": results.regime_table(grid),\n"
                      "                          **{f\"paired_{k}\": v for k, v in paired.items()}},\n                          info={\"our_phi\": "
                      "grid.attrs.get(\"our_phi\"),\n                                \"regime_warnings\": "
                      "grid.attrs.get(\"regime_warnings\", [])})\nsession.finish()"),
    ]
    return name, TransferStudyConfig, cells


def calibration_notebook() -> tuple[str, type, list]:
    name = "03_calibration_robustness"
    cells = header(
        name, "03 · Calibration and robustness",
        """
Reads the runs of a transfer study (`source_study`: a study id, or `latest` = the newest finished
`02_transfer_study` of the artifacts root; it trains nothing) and shows, per method and target, the expected
calibration error and the negative log-likelihood (mean ± std over seeds), reliability diagrams (bins pooled over
seeds), and the accuracy under PGD against the attack radius for the targets the transfer study attacked
(its `robust_targets`).

No transfer study yet? Run `workbench study run 02_transfer_study --profile demo` (or that notebook) first.
""", CalibrationStudyConfig,
        "from workbench import controls, filters, results, study\nfrom workbench.study import CalibrationStudyConfig",
        "source_study 20260101-120000-02-transfer-study-demo-ab12",
        "config field 'targets' must be a list, got str 'cifar10'")
    cells += [
        new_markdown_cell("## The transfer study"),
        new_code_cell("source = results.find_study(session.store, config.source_study)\n"
                      "runs = results.study_runs(session.store, source, config.targets, config.archs, config.methods)\n"
                      "print(f\"source study {source.study_id} (profile {source.profile}): {len(runs)} finished "
                      "transfer runs\")\nruns"),
        new_markdown_cell("## Expected calibration error and NLL (mean ± std over seeds)"),
        new_code_cell("ece = results.summarize(runs, \"test_ece\")\nresults.wide(ece)"),
        new_markdown_cell(FILTER_NOTE),
        new_code_cell("calibration_panel = controls.show(\n"
                      "    lambda metric, **selection: filters.metric_figure(runs, metric, **selection),\n"
                      "    metric=controls.dropdown(filters.metric_choices(), \"test_ece\", \"metric\"),\n"
                      "    **controls.filters(runs, \"target\", \"arch\", \"method\", \"seed\"))"),
        new_code_cell("nll = results.summarize(runs, \"test_nll\")\nresults.wide(nll)"),
        new_markdown_cell("## Reliability diagrams\n\nAccuracy against confidence in 15 equal-width bins, each "
                          "method's bins pooled over its seeds; marker size grows with the number of test images "
                          "in the bin."),
        new_code_cell(filtered_panel("reliability_panel", "filters.reliability_figure(session.store, runs, **selection)",
                                     "target", "arch", "method", "seed")),
        new_markdown_cell("## Accuracy under PGD\n\nFrom the runs' `arrays/robustness.npz` (the transfer study's "
                          "`robust_*` settings; stochastic methods are attacked with expectation over "
                          "transformation). eps 0 is the clean accuracy of the attacked images."),
        new_code_cell("robust = results.robustness_table(session.store, runs, config.robust_target)\n"
                      + filtered_panel("robustness_panel", "filters.robustness_figure(session.store, runs, "
                                       "config.robust_target, **selection)", "arch", "method", "seed")),
        new_code_cell("robust"),
        new_code_cell(source_report("03_calibration_robustness",
                                    "{\"ece\": ece, \"nll\": nll, \"robustness\": robust}")),
    ]
    return name, CalibrationStudyConfig, cells


def scales_notebook() -> tuple[str, type, list]:
    name = "04_scales"
    cells = header(
        name, "04 · Perturbation scales across targets and architectures",
        """
Reads the MetaPerturb runs of a transfer study (`source_study`: a study id or `latest`; it trains nothing) and
shows the per-layer, per-channel perturbation scales phi produces on each target: the mean scale of every layer
(site, in forward order) across targets and architectures, as in the paper's figure, and per-channel heatmaps.
The scales are measured on the test images in evaluation mode and averaged over them (`arrays/site_scales.npz`
of every MetaPerturb run), then averaged over seeds.

No transfer study yet? Run `workbench study run 02_transfer_study --profile demo` (or that notebook) first.
""", ScalesStudyConfig,
        "from workbench import controls, filters, results, study\nfrom workbench.study import ScalesStudyConfig",
        "max_heatmaps 2", "config field 'max_heatmaps' must be an integer, got str 'ten'")
    cells += [
        new_markdown_cell("## The transfer study"),
        new_code_cell("source = results.find_study(session.store, config.source_study)\n"
                      "runs = results.study_runs(session.store, source, config.targets, config.archs, config.methods)\n"
                      "scales = results.scale_data(session.store, runs, config.max_heatmaps)\n"
                      "print(f\"source study {source.study_id}: {scales.profile['n'].max()} seed(s) per curve\")"),
        new_markdown_cell("## Mean scale per layer\n\nOne panel per architecture, one colour per target, one dash "
                          "per phi (ours, the authors'); error bars are the spread over seeds. A phi that adapts "
                          "to the target gives different profiles on different targets."),
        new_markdown_cell(FILTER_NOTE),
        new_code_cell(filtered_panel("profile_panel", "filters.profile_figure(session.store, runs, **selection)",
                                     "target", "arch", "method", "seed", "run")),
        new_code_cell("scales.profile"),
        new_markdown_cell("## Per-channel scales\n\nSites x channels, averaged over seeds (one heatmap per "
                          "architecture, target and phi; at most `max_heatmaps`)."),
        new_code_cell(filtered_panel("heatmap_panel", "filters.heatmap_figure(session.store, runs, "
                                     "config.max_heatmaps, **selection)", "target", "arch", "method", "seed", "run")),
        new_code_cell(source_report("04_scales", "{\"profile\": scales.profile}")),
    ]
    return name, ScalesStudyConfig, cells


def explore_notebook() -> tuple[str, type, list]:
    name = "05_explore_phi"
    cells = header(
        name, "05 · Explore phi",
        """
Looks inside phi: what it does to one batch's features at one perturbation site of a network, and how a second phi
does it differently. Pick a phi (ours from any meta-training run of the artifacts root, the authors' released phi,
the untrained-phi control, or a file given as `phi`), a network (a fresh architecture, or the trained network of a
finished transfer run), a dataset and a batch of it, an image of the batch, a site and the noise coefficient k. For
the choice it shows

- the image, the site's input feature maps h, the noise multiplier maps `s·z` (`1 + k(s·z − 1)` for k ≠ 1) and the
  perturbed maps `h·multiplier` for a few channels, for both phis side by side;
- the per-channel scale s against the statistics it is computed from (the batch mean m_j and variance v_j of four
  pooled kernel responses, the logit's mean and variance terms, the logit);
- the distribution of the multiplier over the whole batch.

Only the chosen site perturbs (the others are off), so both phis see the same features and the same noise draw; the
site uses the batch's statistics, as in training (`workbench.explore`). Nothing is trained here.
""", ExploreConfig,
        "from workbench import controls, explore, study\nfrom workbench.study import ExploreConfig",
        "site 2", "config field 'site' must be an integer, got str 'two'")
    cells += [
        new_markdown_cell("## The selection\n\nThe parameters' choice, computed once: one forward pass of the batch "
                          "per phi (`explore.PhiExplorer.explore`)."),
        new_code_cell("explorer = explore.PhiExplorer(session.store, config.data_root)\n"
                      "exploration = explorer.explore(config)\n"
                      "print(f\"{exploration.network}, site {exploration.site} of {len(exploration.site_names)}, "
                      "{exploration.channels} channels\")\n"
                      "for view in exploration.views:\n"
                      "    print(f\"{view.label}: multiplier mean {view.multiplier_stats['mean']:.4f}, "
                      "std {view.multiplier_stats['std']:.4f}; mean scale {float(view.scale.mean()):.4f}\")"),
        new_markdown_cell("## Explore\n\nMove a control and the three figures follow (in JupyterLab: `make lab`). "
                          "*network* is a fresh network of *fresh architecture* (seeded) or a trained one, whose "
                          "architecture then wins; *channels* takes indices like `0, 1, 2, 3` or `0-3` (Enter to "
                          "apply). A choice that does not fit (a site or channel the network does not have) "
                          "says so in place of the first figure. Executed headless, the figures are those of the "
                          "parameters."),
        new_code_cell(
            "panel = controls.show(\n"
            "    lambda channels, **selection: explore.figures(\n"
            "        explorer.explore(config, channels=explore.parse_channels(channels), **selection)),\n"
            "    phi=controls.dropdown(explorer.phi_choices(config.phi), config.phi, \"phi (A)\"),\n"
            "    compare=controls.dropdown(explorer.phi_choices(config.compare, none=True), config.compare, "
            "\"beside it (B)\"),\n"
            "    network=controls.dropdown(explorer.network_choices(config.network), config.network, \"network\"),\n"
            "    arch=controls.dropdown(explore.ARCHS, config.arch, \"fresh architecture\"),\n"
            "    dataset=controls.dropdown(explorer.dataset_choices(exploration.dataset), exploration.dataset, "
            "\"dataset\"),\n"
            "    batch=controls.slider(0, explorer.batch_count(exploration.dataset, config.split, "
            "config.batch_size) - 1, 1, config.batch, \"batch\"),\n"
            "    image=controls.slider(0, config.batch_size - 1, 1, config.image, \"image\"),\n"
            "    site=controls.slider(0, len(exploration.site_names) - 1, 1, config.site, \"site\"),\n"
            "    channels=controls.text(\", \".join(map(str, config.channels)), \"channels\"),\n"
            "    noise_coeff=controls.slider(0.0, 2.0, 0.05, config.noise_coeff, \"noise coefficient k\"),\n"
            "    statistic=controls.dropdown(study.EXPLORE_STATISTICS, config.statistic, \"scale against\"))"),
        new_markdown_cell("## Per-channel numbers\n\nFor the parameters' selection: each channel's scale and the "
                          "statistics it comes from, per phi (saved with the study as its report)."),
        new_code_cell("table = explore.channel_table(exploration)\ntable"),
        new_code_cell("report = study.save_report(session, \"05_explore_phi\", {\"channels\": table},\n"
                      "                          info={\"network\": exploration.network, \"site\": exploration.site,\n"
                      "                                \"phis\": [v.label for v in exploration.views]})\n"
                      "session.finish()"),
    ]
    return name, ExploreConfig, cells


BUILDERS = [meta_train_notebook, transfer_notebook, calibration_notebook, scales_notebook, explore_notebook]


def build(name: str, cls, cells: list) -> nbformat.NotebookNode:
    for i, cell in enumerate(cells):
        cell["id"] = f"{name[:2]}-{i:02d}"  # stable ids: regenerating gives the same file
    nb = new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3 (ipykernel)", "language": "python"},
        "language_info": {"name": "python"},
        "workbench": {"config": config_path(cls)},
    })
    nbformat.validate(nb)
    return nb


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a notebook is out of date")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write to (default: notebooks/)")
    args = parser.parse_args(argv)
    stale = []
    for builder in BUILDERS:
        name, cls, cells = builder()
        text = nbformat.writes(build(name, cls, cells)) + "\n"
        path = args.out / f"{name}.ipynb"
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(path.name)
            continue
        path.write_text(text)
        print(f"wrote {path}")
    if stale:
        print(f"out of date: {', '.join(stale)}; run .venv/bin/python notebooks/_build.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
