#!/usr/bin/env bash
# Runs the tests that start processes, threads, servers or browsers (DDP, torchrun, Ray,
# the service and its page, kill/resume, Ctrl-C) N times in a row and prints how many runs
# failed and which tests failed how often. A flaky gate throws away whole submissions, so
# the target is 0 of N.
#
#   benchmarks/flake_hunt.sh [N] [PYTEST SELECTION...]
#
#   N                 runs (default 30)
#   PYTEST SELECTION  what to run (default: the process tests below)
#   LOAD=1            keep one core busy with a spinning process beside the tests, as a CI
#                     machine running other work would
#   SRC=path/to/src   test another checkout's code (PYTHONPATH, ahead of the installed one)
#   PYTHON=...        the interpreter (default .venv/bin/python, else python3)
#
# Every run's pytest log is kept in $LOGS (default a new temporary folder), named by run.
set -uo pipefail
cd "$(dirname "$0")/.."
runs=${1:-30}
shift || true
if [ "$#" -gt 0 ]; then
    selection=("$@")
else
    selection=(
        tests/test_ddp.py
        tests/test_ray_encode.py
        tests/test_serve.py
        tests/test_serve_page.py
        tests/test_cli_errors.py
        tests/test_trainer.py::test_resume_after_the_process_is_killed
        tests/test_checkpoint.py
        tests/test_encoding.py
        tests/test_devices.py
    )
fi
python=${PYTHON:-.venv/bin/python}
[ -x "$python" ] || python=python3
logs=${LOGS:-$(mktemp -d -t flake-hunt.XXXXXX)}
mkdir -p "$logs"
if [ -n "${SRC:-}" ]; then
    export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

spinner=""
stop_spinner() { [ -n "$spinner" ] && kill "$spinner" 2>/dev/null; }
trap stop_spinner EXIT
if [ "${LOAD:-0}" = 1 ]; then
    "$python" -c "while True: pass" &
    spinner=$!
fi

echo "flake hunt: $runs runs of ${selection[*]} (load: ${LOAD:-0}; logs in $logs)"
failed=0
started=$(date +%s)
for run in $(seq 1 "$runs"); do
    log="$logs/run-$(printf %03d "$run").log"
    begin=$(date +%s)
    # -p no:randomly is harmless when absent; -rf lists failures by id at the end.
    "$python" -m pytest -q -rf -p no:cacheprovider "${selection[@]}" >"$log" 2>&1
    code=$?
    summary=$(tail -n 1 "$log")
    if [ "$code" -ne 0 ]; then
        failed=$((failed + 1))
        echo "run $run: FAILED (exit $code, $(($(date +%s) - begin)) s): $summary"
        grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
    else
        echo "run $run: passed ($(($(date +%s) - begin)) s): $summary"
    fi
done
echo "failed runs: $failed of $runs ($(($(date +%s) - started)) s in all)"
if [ "$failed" -gt 0 ]; then
    echo "failures by test:"
    cat "$logs"/run-*.log | grep -E '^(FAILED|ERROR) ' | sed -E 's/ - .*//' | sort | uniq -c |
        sort -rn | sed 's/^/    /'
fi
[ "$failed" -eq 0 ]
