#!/usr/bin/env bash
# Renders every picture the README and docs show, from scratch, and records them in docs/img/rendered.sha256:
# - docs/img/confirmation.png and confirmation_rounds.png: the plots a small digits search writes (run here, in a
#   temporary folder);
# - docs/img/runs_page.png: MLflow's runs page as `pathsearch ui` opens it on that search's store, screenshot in
#   headless Chromium by screenshot.py (without MLflow's assistant panel, which opens on a first visit);
# - docs/method/*.png: the method benchmark's plots, drawn again from docs/method/runs.jsonl (nothing trained).
# tests/test_readme.py checks that every picture the docs show is in rendered.sha256 with its current content: a
# picture changed by hand, or added without this script, fails it. Run it when MLflow's UI or a plot changes:
#   bash docs/img/render.sh            # about 3-5 minutes on 2 cores; needs .venv and Debian's `chromium`
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

# The shipped demo made small (25 epochs, 4 blocks, 6 trials); its confirmation as shipped (sequential, top 2 and
# the baseline on paired seeds).
small=(train.epochs=25 train.eval_every=5 model.kwargs.depth=4 search.num_samples=6
       search.scheduler=none space.model.pruned.high=4)
"$python" -m pathsearch.cli search "$root/search_spaces/digits_tiny.yaml" --set "${small[@]}" \
    --storage-path "$work/runs" --tracking-uri "sqlite:///$work/mlflow.db"
cp "$work"/runs/digits_tiny-*/confirmation.png "$img/confirmation.png"
cp "$work"/runs/digits_tiny-*/confirmation_rounds.png "$img/confirmation_rounds.png"

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
"$python" "$img/screenshot.py" "$url" "$img/runs_page.png" --size 1400x800 --wait-for "matching runs"

"$python" "$root/benchmarks/method.py" --report-only --out "$root/docs/method" >/dev/null

# what was rendered, and from which commit: the test compares each picture the docs show with this list
cd "$root"
{
    echo "# written by docs/img/render.sh at commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
         "on $(date -u +%Y-%m-%d); sha256 and path of each picture it rendered"
    sha256sum docs/img/confirmation.png docs/img/confirmation_rounds.png docs/img/runs_page.png docs/method/*.png
} >"$img/rendered.sha256"
cat "$img/rendered.sha256"
