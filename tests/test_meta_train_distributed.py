"""One process and two torchrun processes (gloo, CPU) meta-train the same phi for the same seed."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from workbench.artifacts import RunStore
from workbench.meta_train import MetaTrainConfig, meta_train
from workbench.perturb import MetaPerturb

from helpers import REPO, TINY, save_npz, synthetic_dataset


@pytest.mark.slow
def test_two_torchrun_processes_match_one_process(tmp_path):
    source = save_npz(synthetic_dataset(), tmp_path / "source.npz")
    settings = {**TINY, "source": source, "num_tasks": 4, "steps": 3, "checkpoint_every": 2, "log_every": 1,
                "deterministic": True}
    single = meta_train(MetaTrainConfig.from_dict(settings), store=RunStore(tmp_path / "one"), progress=False)

    root = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "workbench",
               "meta-train", "--artifacts", str(root), "--no-progress",
               *[f"--set={k}={v}" for k, v in settings.items()]]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("phi saved to") == 1, "only rank 0 reports and writes"

    (record,) = RunStore(root).list_runs("meta_train")
    run = RunStore(root).open_run(record.run_id)
    assert run.status == "finished"
    assert run.load_json("runtime")["world_size"] == 2
    distributed = MetaPerturb.load(run.path / "phi.pt")
    for (name, p), q in zip(single.phi.named_parameters(), distributed.parameters()):
        assert (p - q).abs().max().item() <= 1e-5, name
    # metrics of the tasks on rank 1 reach rank 0's log, and equal the single process's
    rows = {(r["step"], r["task"]): r for r in run.read_metrics("meta_train")}
    assert sorted(rows) == [(s, t) for s in (1, 2, 3) for t in range(4)]
    ref = {(r["step"], r["task"]): r for r in RunStore(tmp_path / "one").open_run(single.run_id).read_metrics("meta_train")}
    for key, row in rows.items():
        assert row["heldout_loss"] == pytest.approx(ref[key]["heldout_loss"], rel=1e-5, abs=1e-6)
    # the full checkpoint holds every task, whichever rank ran it
    assert sorted(run.load_checkpoint("last")["trainer"]["tasks"]) == [0, 1, 2, 3]
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["heldout_acc"] == pytest.approx(single.summary["heldout_acc"])
