#!/usr/bin/env bash
# Runs the tests that start processes, threads, servers or browsers (DDP and torchrun, the
# ranks' agreement, Ray, the service, its page and its threads, DataLoader workers,
# kill/resume, Ctrl-C, the streamed-encoding memory test) N times in a row and prints how
# many runs failed, which tests failed how often, and the log of each failed run. A flaky
# gate throws away whole submissions, so the target is 0 of N.
#
#   benchmarks/flake_hunt.sh [N] [PYTEST SELECTION...]
#
#   N                 runs (default 30)
#   PYTEST SELECTION  what to run (default: the process tests below)
#   LOAD=1            keep one core busy with a spinning process beside the tests, as a CI
#                     machine running other work would
#   SRC=path/to/src   the code to test (default: this checkout's src/, put on PYTHONPATH ahead
#                     of the installed one, which may be another checkout's editable install)
#   PYTHON=...        the interpreter (default .venv/bin/python of this checkout, else of the
#                     main checkout when this is a git worktree, else python3)
#   WORKERS=n         pytest-xdist workers, one test file each at a time (default 2, as
#                     `make test` runs the suite; 1 runs the tests one after another)
#   RUN_TIMEOUT=s     a run still going after this many seconds is killed and counts as
#                     failed (default 1800: a hang is a failure, not a stalled hunt)
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
        tests/test_training_agreement.py
        tests/test_ray_encode.py
        tests/test_encode_job.py
        tests/test_serve.py
        tests/test_serve_page.py
        tests/test_serve_context.py
        tests/test_serve_encoder.py
        tests/test_serve_locks.py
        tests/test_loading.py
        tests/test_cli_errors.py
        tests/test_trainer.py::test_resume_after_the_process_is_killed
        tests/test_checkpoint.py
        tests/test_encoding.py
        tests/test_devices.py
    )
fi
python=${PYTHON:-.venv/bin/python}
if [ ! -x "$python" ] && [ -z "${PYTHON:-}" ]; then
    main_checkout=$(dirname "$(git rev-parse --path-format=absolute --git-common-dir 2>/dev/null)")
    python=$main_checkout/.venv/bin/python
    [ -x "$python" ] || python=python3
fi
logs=${LOGS:-$(mktemp -d -t flake-hunt.XXXXXX)}
mkdir -p "$logs"
export PYTHONPATH="${SRC:-$PWD/src}${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

spinner=""
stop_spinner() { [ -n "$spinner" ] && kill "$spinner" 2>/dev/null; }
trap stop_spinner EXIT
if [ "${LOAD:-0}" = 1 ]; then
    "$python" -c "while True: pass" &
    spinner=$!
fi

workers=${WORKERS:-2}
parallel=()
[ "$workers" -gt 1 ] && parallel=(-n "$workers" --dist loadfile)
echo "flake hunt: $runs runs of ${selection[*]} (workers: $workers; load: ${LOAD:-0}; logs in $logs)"
failed=0
failed_logs=()
started=$(date +%s)
for run in $(seq 1 "$runs"); do
    log="$logs/run-$(printf %03d "$run").log"
    begin=$(date +%s)
    # -rf lists the failures by id at the end of each log; -q comes from pyproject's addopts
    # (a second one would drop the "N passed" line).
    timeout -k 30 "${RUN_TIMEOUT:-1800}" \
        "$python" -m pytest -rf -p no:cacheprovider "${parallel[@]}" "${selection[@]}" >"$log" 2>&1
    code=$?
    summary=$(grep -v "^[[:space:]]*$" "$log" | tail -n 1)
    [ "$code" -eq 124 ] && summary="killed after ${RUN_TIMEOUT:-1800} s (a hang)"
    if [ "$code" -ne 0 ]; then
        failed=$((failed + 1))
        failed_logs+=("$log")
        echo "run $run: FAILED (exit $code, $(($(date +%s) - begin)) s): $summary; log: $log"
        grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /'
    else
        echo "run $run: passed ($(($(date +%s) - begin)) s): $summary"
    fi
done
echo "failed runs: $failed of $runs ($(($(date +%s) - started)) s in all; logs in $logs)"
if [ "$failed" -gt 0 ]; then
    echo "failures by test:"
    cat "$logs"/run-*.log | grep -E '^(FAILED|ERROR) ' | sed -E 's/ - .*//' | sort | uniq -c |
        sort -rn | sed 's/^/    /'
    echo "logs of the failed runs:"
    printf '    %s\n' "${failed_logs[@]}"
fi
[ "$failed" -eq 0 ]
