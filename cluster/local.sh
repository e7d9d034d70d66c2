#!/usr/bin/env bash
# cluster/local.sh up|down|status [--dir runs/cluster] [--workers 2] [--mlflow-port 5000] ...
# A Ray head, N worker nodes and an MLflow server on 127.0.0.1 of this machine (token auth on), to try
# `pathsearch submit` without a cloud; `down` stops exactly what `up` started. Options: cluster/local.sh --help.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
python="${PATHSEARCH_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
PATHSEARCH_PROG=cluster/local.sh exec "$python" -m pathsearch.cluster.local "$@"
