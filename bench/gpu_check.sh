#!/usr/bin/env bash
# One command for a GPU machine (no network needed): build pcfast._C for this GPU only, run
# `pcfast doctor`, the GPU tests and the benchmarks (ops, epoch, traffic model), and leave every
# result as JSON plus one Markdown summary (SUMMARY.md) in one folder.
#
#   bash bench/gpu_check.sh [OUT_DIR]        # default: bench/results/gpu-<gpu>-<date>
#
# torch, triton, ninja and pytest must already be installed (nothing is downloaded: --no-deps).
# Each part has a time limit so the whole run stays within about 8 minutes on an H100; a part that
# fails or runs out of time is recorded in the summary and the script goes on with the next one.
# The exit code is 0 only when every part passed.
set -uo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU is visible to torch; run this on a GPU machine" >&2
  exit 2
fi
GPU=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '-'))")
CC=$(python -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
OUT=${1:-bench/results/gpu-${GPU}-$(date +%Y%m%d-%H%M)}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
export PCFAST_RESULTS_DIR="$OUT"  # every bench/*.py writes its JSON here
STATUS="$OUT/parts.tsv"
printf 'part\tstatus\tseconds\tlog\n' > "$STATUS"

run_part() {  # run_part NAME LIMIT_SECONDS COMMAND...
  local name=$1 limit=$2 start rc status
  shift 2
  start=$SECONDS
  echo "== $name (limit ${limit}s)"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  case $rc in
    0) status=pass ;;
    124) status="timeout after ${limit}s" ;;
    *) status="fail (exit $rc)" ;;
  esac
  printf '%s\t%s\t%d\t%s\n' "$name" "$status" $((SECONDS - start)) "$name.log" >> "$STATUS"
  tail -n 3 "$OUT/$name.log"
  echo "-- $name: $status in $((SECONDS - start))s"
}

JOBS=$(( $(nproc) < 16 ? $(nproc) : 16 ))
run_part build 300 env MAX_JOBS="$JOBS" PCFAST_CUDA_ARCHS="$CC" \
  python -m pip install --no-build-isolation --no-deps -e .
run_part doctor 120 python -m pcfast doctor --json "$OUT/doctor.json"
run_part gpu-tests 240 python -m pytest -q -m gpu --junitxml="$OUT/gpu-tests.xml" tests
run_part bench-pc-update 60 python bench/bench_pc_update.py --device cuda
run_part bench-dwconv 60 python -m bench.bench_dwconv --device cuda
run_part epoch 240 python bench/epoch.py --device cuda --batches 5 --modes reference,fast,bp
run_part epoch-naive 120 python bench/epoch.py --device cuda --batches 1 --modes naive
run_part cost 180 python bench/cost.py --models resdualnet resnet20 resnet56 --schedules jacobi sequential

python bench/gpu_summary.py "$OUT" > "$OUT/SUMMARY.md"
echo "== results in $OUT (summary: $OUT/SUMMARY.md)"
! grep -qv -e $'\tpass\t' -e '^part' "$STATUS"
