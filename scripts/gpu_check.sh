#!/usr/bin/env bash
# The checks of issue 12 on a lent GPU machine, prepared here so a session with device time only has to run them.
#
#   ../shared/gpu/prepare && scripts/gpu_check.sh carry     # here: the shared carry, plus the wheels the rest of
#                                                           # the suite needs there (optuna, tensorboard, PyYAML)
#   scripts/gpu_check.sh suite                              # there (run tool, carry .gpu-carry): the test suite
#   scripts/gpu_check.sh bench                              # there: benchmarks/bench.py --gpu (setups, sweep,
#                                                           # one profiled run),
#                                                           # then benchmarks/eval_speed.py --gpu
#   scripts/gpu_check.sh levers                             # there: tuned with each lever, its own command so
#                                                           # each fits the run tool's 10 minutes
#
#   scripts/gpu_check.sh bench levers                       # both in one command, one after the other (each
#                                                           # benchmark is cut at GPU_CHECK_LIMIT=570 s; the
#                                                           # rows it measured stay in partial.json)
#
# Streamlit, papermill and Playwright are not carried: the app, browser and notebook tests are left out there.
# Results go to $OUT (what the run tool brings back), else results/gpu.
set -euo pipefail
cd "$(dirname "$0")/.."  # the repository root (the GPU machine's copy of the tree has no .git)
out=${OUT:-results/gpu}
limit=${GPU_CHECK_LIMIT:-570}  # seconds per benchmark command: under the run tool's 600, so partial.json comes back

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
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
  python3 -m pytest -q -p no:cacheprovider --junitxml="$out/suite.xml" \
    --ignore=tests/test_app.py --ignore=tests/test_app_browser.py --ignore=tests/test_notebook.py 2>&1 \
    | tee "$out/suite.txt" | tail -40
  ;;
bench)
  carried
  mkdir -p "$out"
  # the report, then the held-out scoring benchmark; each log kept whole in $OUT (the run tool shows the tail)
  timeout "$limit" python3 benchmarks/bench.py --gpu --profile --out "$out" 2>&1 | tee "$out/bench.log" | tail -40 \
    || echo "bench.py stopped (rc $?): its rows so far are in $out/partial.json"
  timeout "$limit" python3 benchmarks/eval_speed.py --gpu --json "$out/eval-speed.json" 2>&1 \
    | tee "$out/eval-speed.log" | tail -20 || echo "eval_speed.py stopped (rc $?)"
  ;;
levers)
  carried
  mkdir -p "$out/levers"
  timeout "$limit" python3 benchmarks/bench.py --gpu --setups tuned --levers --no-sweep --out "$out/levers" 2>&1 \
    | tee "$out/levers/levers.log" | tail -30 || echo "levers stopped (rc $?): rows so far in $out/levers/partial.json"
  ;;
*)
  echo "usage: scripts/gpu_check.sh carry|suite|bench|levers ..." >&2
  exit 2
  ;;
esac
done
