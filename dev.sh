#!/usr/bin/env bash
# Set-up and entry point. `./dev.sh run` installs into .venv (created if missing, reused if present) and runs the
# main job on embedded defaults; `./dev.sh test` does the same set-up and runs the whole test suite.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "pathsearch needs Python >= 3.10")'
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Reinstall only when pyproject.toml changed since the last successful install.
stamp=.venv/.pathsearch-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    # pip's own notices go to a log, shown only when the install fails: the console is the job's
    log=.venv/pip-install.log
    echo "installing pathsearch and its dependencies into .venv (a few minutes; pip's log: $log)"
    if ! { .venv/bin/python -m pip install --quiet --upgrade pip && .venv/bin/python -m pip install --quiet -e '.[dev]'; } >"$log" 2>&1; then
        cat "$log" >&2
        exit 1
    fi
    touch "$stamp"
fi

verb=${1:-run}
[ $# -gt 0 ] && shift
case "$verb" in
    run)  exec .venv/bin/pathsearch search search_spaces/digits_tiny.yaml "$@" ;;
    test) exec .venv/bin/python -m pytest "$@" ;;
    *)    echo "usage: ./dev.sh run|test [args...]" >&2; exit 2 ;;
esac
