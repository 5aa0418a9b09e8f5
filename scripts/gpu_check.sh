#!/usr/bin/env bash
# The checks of issue 12 on a lent GPU machine, prepared here so a session with device time only has to run them.
#
#   ../shared/gpu/prepare && scripts/gpu_check.sh carry     # here: the shared carry, plus the wheels the rest of
#                                                           # the suite needs there (optuna, tensorboard, PyYAML)
#   scripts/gpu_check.sh suite                              # there (run tool, carry .gpu-carry): the test suite
#   scripts/gpu_check.sh bench                              # there: benchmarks/bench.py --gpu (setups, sweep,
#                                                           # one profiled run): issue 12's numbers
#   scripts/gpu_check.sh levers                             # there: tuned with each lever
#   scripts/gpu_check.sh eval                               # there: benchmarks/eval_speed.py --gpu
#
#   scripts/gpu_check.sh bench levers eval                  # several in one command, one after the other, in
#                                                           # GPU_CHECK_BUDGET=570 s all together (under the run
#                                                           # tool's 600): a check cut short keeps the rows it
#                                                           # measured in partial.json; one with under 30 s left
#                                                           # is skipped with a line
#
# Streamlit, papermill and Playwright are not carried: the app, browser and notebook tests are left out there.
# Results go to $OUT (what the run tool brings back), else results/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root (the GPU machine's copy of the tree has no .git)
out=${OUT:-results/gpu}
deadline=$((SECONDS + ${GPU_CHECK_BUDGET:-570}))  # for the whole call: under the run tool's 600, so $OUT comes back

left() {  # seconds this call has left for the next check, or skip it when too few are left
  local n=$((deadline - SECONDS))
  if [ "$n" -lt 30 ]; then echo "skipped: $n s of GPU_CHECK_BUDGET left" >&2; return 1; fi
  echo "$n"
}

carried() {  # the pinned wheels and the shared data, brought along by the run tool's carry
  [ -f .gpu-carry/env.sh ] || { echo "error: .gpu-carry/env.sh is missing: run ../shared/gpu/prepare in the checkout and carry .gpu-carry" >&2; exit 2; }
  source .gpu-carry/env.sh
}

[ $# -gt 0 ] || set -- usage
for check in "$@"; do  # several in one call (e.g. `bench levers`): one machine start, results as each finishes
case "$check" in
carry)
  [ -d .gpu-carry/whl ] || { echo "error: .gpu-carry/whl is missing: run ../shared/gpu/prepare first" >&2; exit 2; }
  # the versions this checkout's venv resolved, for Python 3.12 on x86-64 Linux
  pins=$(.venv/bin/pip freeze | grep -iE '^(optuna|sqlalchemy|alembic|colorlog|mako|greenlet|tensorboard|tensorboard-data-server|grpcio|protobuf|markdown|werkzeug|absl-py|pyyaml)==')
  # shellcheck disable=SC2086
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .gpu-carry/whl $pins 2>&1 | { grep -v '^WARNING' || true; }
  echo "carry: $(du -sh .gpu-carry | cut -f1) in .gpu-carry"
  ;;
suite)
  carried
  mkdir -p "$out"
  n=$(left) || continue
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  # -v: each result in suite.txt as it comes, so a suite cut at the deadline still says what passed on CUDA
  timeout "$n" python3 -m pytest -v -p no:cacheprovider --junitxml="$out/suite.xml" \
    --ignore=tests/test_app.py --ignore=tests/test_app_browser.py --ignore=tests/test_notebook.py 2>&1 \
    | tee "$out/suite.txt" | tail -40 || echo "pytest rc $? (1: a test failed, 124: cut at the deadline): every result is in $out/suite.txt"
  ;;
bench)
  carried
  mkdir -p "$out"
  n=$(left) || continue
  # the whole log kept in $OUT (the run tool shows the tail)
  timeout "$n" python3 benchmarks/bench.py --gpu --profile --out "$out" 2>&1 | tee "$out/bench.log" | tail -40 \
    || echo "bench.py stopped (rc $?): its rows so far are in $out/partial.json"
  ;;
eval)
  carried
  mkdir -p "$out"
  n=$(left) || continue
  timeout "$n" python3 benchmarks/eval_speed.py --gpu --json "$out/eval-speed.json" 2>&1 \
    | tee "$out/eval-speed.log" | tail -20 || echo "eval_speed.py stopped (rc $?)"
  ;;
levers)
  carried
  mkdir -p "$out/levers"
  n=$(left) || continue
  timeout "$n" python3 benchmarks/bench.py --gpu --setups tuned --levers --no-sweep --out "$out/levers" 2>&1 \
    | tee "$out/levers/levers.log" | tail -30 || echo "levers stopped (rc $?): rows so far in $out/levers/partial.json"
  ;;
*)
  echo "usage: scripts/gpu_check.sh carry|suite|bench|levers|eval ..." >&2
  exit 2
  ;;
esac
done
