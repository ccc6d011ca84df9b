#!/usr/bin/env bash
# Scoring on a GPU, in under 8 minutes: volumes/s, GPU utilization and the share of the time the model waited for
# the loader, for the reference model package with autocast on (bf16, or fp16 where the GPU has no bf16) and off
# (float32), preprocessing cache off and warm, on synthetic full-size CT series (160 slices of 512x512).
#
# Run from anywhere on a machine with an NVIDIA GPU and a Python that has this project's dependencies (torch with
# CUDA, monai, pydicom...; no network needed):
#
#   bash bench/gpu_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else .riskbridge/gpu-check
#   bash bench/gpu_check.sh --cpu-smoke [OUT_DIR]  # no GPU: a tiny CPU run that proves the script works end to end
#
# The Python is $PYTHON if set, else .venv/bin/python, else python3, the first one that imports the dependencies.
# riskbridge is imported from this working tree (a symlinked package view on PYTHONPATH), so neither an installed
# riskbridge nor the editable install's absolute paths are needed. Writes to OUT_DIR: gpu.txt (nvidia-smi's view of
# the card), gpu-util.csv (utilization sampled every 0.5 s), scoring-lean.json and scoring-lean.md (the table for
# docs/benchmarks.md, "Scoring on a GPU") and bench.log. Exit status: 0 measured, 2 something missing (says what),
# else the benchmark's. Tunable by environment: GPU_CHECK_SERIES (8), GPU_CHECK_REQUESTS (48 per loader worker, at
# most 512: cache off), GPU_CHECK_CACHED_REQUESTS (8192: cache warm), GPU_CHECK_WORKERS (cores - 1, at most 8).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
smoke=0
if [[ ${1:-} == --cpu-smoke ]]; then
  smoke=1
  shift
fi
out=${1:-${OUT:-$root/.riskbridge/gpu-check}}
mkdir -p "$out"
out=$(cd "$out" && pwd)
started=$SECONDS
# The whole script stays under 8 minutes: writing the series and starting up take about a minute on a GPU server,
# the benchmark starts no run after its deadline and is stopped at its limit (its results file is rewritten after
# every run, so what it measured stays).
bench_limit_s=390
bench_deadline_s=300

missing() {
  echo "gpu_check: $*" >&2
  exit 2
}

# 1. The card.
if [[ $smoke == 0 ]]; then
  command -v nvidia-smi > /dev/null || missing "nvidia-smi not found: no NVIDIA driver here (use --cpu-smoke to test the script on the CPU)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap --format=csv > "$out/gpu.txt" 2>&1 \
    || missing "nvidia-smi sees no GPU: $(head -n 1 "$out/gpu.txt")"
  # The GPU torch uses: the first of CUDA_VISIBLE_DEVICES (an index or a UUID, both of which nvidia-smi -i takes).
  gpu_id=${CUDA_VISIBLE_DEVICES:-0}
  gpu_id=${gpu_id%%,*}
  if ! card=$(nvidia-smi --query-gpu=name --format=csv,noheader -i "$gpu_id" 2> /dev/null); then
    gpu_id=0 # an id nvidia-smi does not take (a MIG UUID): the first GPU
    card=$(nvidia-smi --query-gpu=name --format=csv,noheader -i 0)
  fi
  echo "card: $card (nvidia-smi -i $gpu_id)"
fi

# 2. A Python with the dependencies.
python=""
for candidate in "${PYTHON:-}" "$root/.venv/bin/python" "$(command -v python3 || true)"; do
  [[ -n $candidate && -x $candidate ]] || continue
  if "$candidate" -c "import torch, monai, pydicom, numpy, pydantic" 2> /dev/null; then
    python=$candidate
    break
  fi
  echo "gpu_check: $candidate lacks: $("$candidate" -c "
import importlib
names = ['torch', 'monai', 'pydicom', 'numpy', 'pydantic']
gone = []
for name in names:
    try:
        importlib.import_module(name)
    except Exception:
        gone.append(name)
print(', '.join(gone))" 2>&1 | tail -n 1)" >&2
done
[[ -n $python ]] || missing "no Python with torch, monai, pydicom, numpy and pydantic: set PYTHON, or build .venv with scripts/bootstrap.sh (needs the network, or a pip cache holding constraints.txt's wheels)"
echo "python: $python ($("$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'))"
if [[ $smoke == 0 ]]; then
  "$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || missing "torch $("$python" -c 'import torch; print(torch.__version__)') sees no CUDA device (a CPU-only build, or a driver older than its CUDA)"
fi

# 3. riskbridge from this working tree: riskbridge/ with connectors/, harmonize/ and model/ inside, as installed.
view=$(mktemp -d)
sampler=""
cleanup() {
  [[ -z $sampler ]] || kill "$sampler" 2> /dev/null || true
  rm -rf "$view"
}
trap cleanup EXIT
mkdir "$view/riskbridge"
for entry in "$root"/riskbridge/*; do
  ln -s "$entry" "$view/riskbridge/"
done
for subpackage in connectors harmonize model; do
  ln -s "$root/$subpackage" "$view/riskbridge/$subpackage"
done
export PYTHONPATH="$view${PYTHONPATH:+:$PYTHONPATH}"
# From inside the view: python -c puts the working directory first on the import path, and the repository root's
# riskbridge/ lacks the subpackages.
where=$(cd "$view" && "$python" -c "import riskbridge.model.scoring as s; from riskbridge.model.package import \
reference_package_path as r; r(); print(s.__file__)") || missing "riskbridge does not import from $root with $python"
[[ $where == "$view"/* ]] || missing "riskbridge was imported from $where, not from this working tree"

# 4. The benchmark, with nvidia-smi sampling in the background.
if [[ $smoke == 1 ]]; then
  echo "CPU smoke run: tiny volumes, a handful of requests; no GPU is measured"
  arguments=(--device cpu --amp off bf16 --series 1 --slices 24 --size 64 --requests 4 --cached-requests 8
    --workers 1 --batch-size 2)
else
  cores=$(nproc)
  workers=${GPU_CHECK_WORKERS:-$((cores > 9 ? 8 : (cores > 1 ? cores - 1 : 1)))}
  requests=${GPU_CHECK_REQUESTS:-$((48 * workers > 512 ? 512 : 48 * workers))}
  arguments=(--device cuda --amp auto off --series "${GPU_CHECK_SERIES:-8}" --slices 160 --size 512
    --requests "$requests" --cached-requests "${GPU_CHECK_CACHED_REQUESTS:-8192}" --workers "$workers"
    --gpu-log "$out/gpu-util.csv")
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -lms 500 \
    -i "$gpu_id" > "$out/gpu-util.csv" 2> /dev/null &
  sampler=$!
fi
status=0
# With pipefail the pipeline's status is the benchmark's (124/137 when timeout stopped it), not tee's.
timeout -k 10 "$bench_limit_s" "$python" "$root/bench/scoring.py" --lean --package reference --out "$out" \
  --deadline-s "$bench_deadline_s" "${arguments[@]}" 2>&1 | tee "$out/bench.log" || status=$?

if [[ $status == 124 || $status == 137 ]]; then
  echo "gpu_check: the benchmark ran past ${bench_limit_s} s and was stopped; the runs it finished:" >&2
  cat "$out/scoring-lean.md" 2> /dev/null || true
fi
echo "gpu_check: $((SECONDS - started)) s, results in $out (exit status $status)"
exit "$status"
