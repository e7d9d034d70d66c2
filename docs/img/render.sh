#!/usr/bin/env bash
# Regenerates the README's pictures from scratch: runs a small digits search in a temporary folder, copies the
# confirmation plot it writes (confirmation.png), serves its store with `pathsearch ui` and screenshots the runs
# page that opens in headless Chromium (runs_page.png). Run it again when MLflow's UI or the plot changes:
#   bash docs/img/render.sh            # about 2-3 minutes on 2 cores; needs .venv and Debian's `chromium`
set -euo pipefail
img=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$img/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
work=$(mktemp -d)
ui=
cleanup() {
    if [ -n "$ui" ] && kill -0 "$ui" 2>/dev/null; then
        kill -TERM "$ui" && wait "$ui" || true   # `pathsearch ui` stops its MLflow server's whole group
    fi
    rm -rf "$work"
}
trap cleanup EXIT
cd "$work"

# The shipped demo made small (25 epochs, 4 blocks, 6 trials); its confirmation as shipped: top 2 and the
# baseline on 4 paired seeds.
small=(train.epochs=25 train.eval_every=5 model.kwargs.depth=4 search.num_samples=6
       search.scheduler=none space.model.pruned.high=4)
"$python" -m pathsearch.cli search "$root/search_spaces/digits_tiny.yaml" --set "${small[@]}" \
    --storage-path "$work/runs" --tracking-uri "sqlite:///$work/mlflow.db"
cp "$work"/runs/digits_tiny-*/confirmation.png "$img/confirmation.png"

port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$python" -m pathsearch.cli ui --tracking-uri "sqlite:///$work/mlflow.db" --port "$port" >"$work/ui.out" 2>&1 &
ui=$!
url=
for _ in $(seq 120); do  # the printed URL, once the server answers /health
    url=$(sed -n 's/^MLflow UI at \(http[^ ]*\).*/\1/p' "$work/ui.out")
    if [ -n "$url" ] && "$python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
        break
    fi
    url=
    sleep 0.5
done
[ -n "$url" ] || { cat "$work/ui.out" >&2; echo "render.sh: pathsearch ui did not come up" >&2; exit 1; }
echo "screenshot of $url"
# a fresh profile (no saved UI state); the virtual time budget lets MLflow's JavaScript load the runs table
chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars --user-data-dir="$work/profile" \
    --window-size=1400,800 --virtual-time-budget="${BUDGET_MS:-30000}" --screenshot="$img/runs_page.png" "$url" \
    2>"$work/chromium.log" || { cat "$work/chromium.log" >&2; exit 1; }
ls -l "$img/runs_page.png" "$img/confirmation.png"
