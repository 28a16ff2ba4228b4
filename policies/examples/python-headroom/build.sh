#!/usr/bin/env bash
# Builds python_headroom.wasm from app.py with componentize-py (from PyPI:
# `pip install componentize-py==0.25.1`; set COMPONENTIZE_PY to use another path), then runs it on
# an example input through the controller's `policy test`, checking the decision.
#
# --stub-wasi replaces the WASI imports the Python runtime declares with trapping stubs inside the
# component: the controller grants policies no WASI, and without it CPython's start-up asks for its
# environment and the call traps.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
componentize_py="${COMPONENTIZE_PY:-componentize-py}"
cd "$here"
"$componentize_py" -d ../../../wit -w pool-sizing-policy componentize --stub-wasi app -o python_headroom.wasm
echo "built $here/python_headroom.wasm ($(wc -c < python_headroom.wasm) bytes)"

controller="${SANDBOX_CONTROLLER:-}"
if [[ -z "$controller" ]]; then
  cargo build --quiet --manifest-path ../../../Cargo.toml
  controller="${CARGO_TARGET_DIR:-../../../target}/debug/sandbox-controller"
fi
echo '{"headroomPercent": 50}' > /tmp/python-headroom-settings.json
out="$("$controller" policy test python_headroom.wasm --input ../inputs/pool-sizing.json \
  --settings /tmp/python-headroom-settings.json 2>/dev/null)"
echo "$out"
# 10 allocated, 50% headroom = 5 idle, within buffer [2, 6]: 15 pods.
grep -q '"desired_total": 15' <<< "$out" || { echo "unexpected decision" >&2; exit 1; }
echo "ok: the Python policy decides as expected"
