#!/usr/bin/env bash
# Everything that needs a GPU, in one command: build the CUDA noise kernel, run the GPU tests,
# then the benchmarks. Each step logs to $OUT/<step>.log (or ./gpu-logs when $OUT is unset) and
# a failing step does not stop the next one. Wheels for packages the machine lacks
# (megatron-core) are installed from ./.whl when that folder exists.
#
#   bash benchmarks/gpu_session.sh [steps...]      # default: build tests attention noise train
#
# Steps: build, tests, attention, noise, train, decode, compare. TESTS=paths narrows the GPU
# tests, ATTN_ARGS adds benchmark options (e.g. --sweep), COMPARE_ARGS options of the comparison
# and COMPARE_LIMIT its time limit in seconds (default 550).
set -u
export PYTHONUNBUFFERED=1
LOG=${OUT:-gpu-logs}
mkdir -p "$LOG" && LOG=$(cd "$LOG" && pwd)
PY=${PY:-python3}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(build tests attention noise train)

run_step() {  # name, limit seconds, command...
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  echo "=== $name: $*"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "=== $name rc=$rc in $(( $(date +%s) - t0 )) s"
  tail -n 25 "$LOG/$name.log"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch, megatron.core as m; print('torch', torch.__version__, 'megatron-core', m.__version__)"
} 2>&1

for s in "${steps[@]}"; do
  case $s in
    build) run_step build 150 env MAX_JOBS=16 NBDIFF_BUILD_CUDA=1 $PY setup.py build_ext --inplace
           cp megatron_nbdiff/_noise_*cpython-312*.so "$LOG"/ 2>/dev/null ;;
    tests) run_step tests 250 $PY -m pytest -q -p no:cacheprovider -m gpu ${TESTS:-tests} ;;
    attention) run_step attention 240 $PY benchmarks/attention.py ${ATTN_ARGS:-} ;;
    noise) run_step noise 60 $PY benchmarks/noise.py ;;
    train) run_step train 300 $PY benchmarks/train_step.py ;;
    decode) run_step decode 300 $PY benchmarks/decode.py ;;
    # the comparison records finished stages in /tmp/nbdiff-compare: if a call's time limit cuts
    # it off, the same step in the next call (on the same, still warm machine) continues there;
    # COMPARE_ARGS adds options (e.g. --adapt-seeds 0,1). It does not need the build step.
    compare) run_step compare ${COMPARE_LIMIT:-550} $PY examples/recipe_comparison/run.py --out /tmp/nbdiff-compare ${COMPARE_ARGS:-}
             (cd /tmp/nbdiff-compare && cp --parents report.json stages.json comparison.* training.png run_*/metrics.jsonl "$LOG"/) ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
