#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one go: the tests marked gpu; the perturbation's step overhead (eager sites)
# and the meta-step ratio (the trainer's defaults: on a GPU, compiled sites and captured steps); the step ratios with
# eager sites, compiled sites (compile_sites) and CUDA graphs (cuda_graphs) for ResNet-20, Conv-4 and WRN-16-4 at
# batch 128, and the meta step for 10 tasks in the same three settings (benchmarks/compiled_site.py --steps-on cuda);
# then the wall time of the paper's meta-training setting (ResNet-20, 10 tasks of Tiny ImageNet 32x32, 750 steps,
# batch 128) with the options at their defaults (on a GPU: compiled sites and captured task steps, float32).
#
#   bash benchmarks/gpu_check.sh [LOG_DIR] [MAX_SECONDS_FOR_META_TRAINING]
#
# Needs the reference files in ../shared/reference (the gpu tests) and tinyimagenet32.npz under the data root
# ($WORKBENCH_DATA or ../shared/data). Each part logs to LOG_DIR (default ./gpu_check_logs) and a failing part does not
# stop the next. The meta-training run is stopped after MAX_SECONDS (default 420); its metrics then say how far it got.
set -u
cd "$(dirname "$0")/.."
logs=${1:-gpu_check_logs}
limit=${2:-420}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python3 -c 'import torch; print("torch", torch.__version__, torch.cuda.get_device_name(0))' | tee "$logs/device.txt"

python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider 2>&1 | tee "$logs/gpu_tests.txt" | tail -5
python3 benchmarks/perturb_overhead.py --device cuda --steps 30 2>&1 | tee "$logs/perturb_overhead_cuda.txt"
python3 benchmarks/meta_train_speed.py --device cuda --tasks 10 --rounds 5 2>&1 | tee "$logs/meta_train_speed_cuda.txt"
python3 benchmarks/compiled_site.py --steps-on cuda --batch 128 --steps 30 --tasks 10 --rounds 5 2>&1 \
    | tee "$logs/compiled_sites_and_graphs_cuda.txt"

artifacts=$(mktemp -d)
start=$(date +%s)
timeout "$limit" python3 -m workbench meta-train --artifacts "$artifacts" --set device=cuda --set source=tinyimagenet32 \
    --set arch=resnet20 --set num_tasks=10 --set split_scheme=original --set image_size=32 --set batch_size=128 \
    --set steps=750 --set log_every=50 --set checkpoint_every=250 --set seed=0 --set compile_sites=auto \
    --set cuda_graphs=auto --set precision=fp32 >"$logs/paper_meta_train.txt" 2>&1
status=$?
end=$(date +%s)
{
    echo "exit status $status after $((end - start)) s (limit $limit s)"
    python3 - "$artifacts" <<'EOF'
import json, sys
from pathlib import Path
for run in sorted(Path(sys.argv[1], "runs").glob("*")):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    phi = [r for r in rows if r.get("stage") == "phi"]
    if phi:
        print(f"{run.name}: last logged step {phi[-1]['step']}, {phi[-1]['wall_time'] - rows[0]['wall_time']:.1f} s "
              f"after the first log line (step {rows[0]['step']})")
    summary = run / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        print("summary:", {k: s[k] for k in ("steps", "seconds", "seconds_per_step", "heldout_acc_mean", "device")})
EOF
} | tee "$logs/paper_meta_train_summary.txt"
tail -c 3000 "$logs/paper_meta_train.txt"
