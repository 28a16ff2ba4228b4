#!/usr/bin/env bash
# The fault suite (`make chaos`): a local cluster of its own, the CRDs, then `sandbox-chaos`, which
# runs the real controller behind a fault-injecting proxy and prints its figures (docs/chaos.md).
# Everything started here is stopped on exit, whatever the outcome.
#
#   src/devtools/chaos.sh [sandbox-chaos args...]     e.g. --seed 42 --allocations 100 --kills 3
#
# Environment:
#   SBX_CHAOS_DEV_DIR   the cluster's state directory (default <repo>/.dev-chaos; never the .dev of
#                       `make dev` / `make test`)
#   SBX_PORT_BASE       its port block (default: the first free block from 16440 on); the proxy
#                       listens on base+6, the controllers' health endpoints on base+7 and base+8
#   SBX_NODES           kwok nodes (default 4)
#   SBX_CHAOS_TIMEOUT   hard limit in seconds for sandbox-chaos itself (default 1500)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
export SBX_DEV_DIR="${SBX_CHAOS_DEV_DIR:-$repo/.dev-chaos}"
export SBX_NODES="${SBX_NODES:-4}"
unset KUBECONFIG
cluster="$repo/deploy/local/cluster.sh"
log() { printf '[chaos] %s\n' "$*" >&2; }

chaos_pid=""
cleanup() {
	local rc=$?
	trap - EXIT INT TERM
	set +e
	if [[ -n "$chaos_pid" ]] && kill -0 "$chaos_pid" 2>/dev/null; then
		kill -TERM "$chaos_pid" 2>/dev/null
		wait "$chaos_pid" 2>/dev/null
	fi
	"$cluster" down >/dev/null 2>&1
	log "cluster in $SBX_DEV_DIR stopped"
	exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "building the workspace (cargo build --workspace --all-targets)"
cargo build --workspace --all-targets
bin="${CARGO_TARGET_DIR:-$repo/target}/debug"
for b in sandbox-chaos sandbox-controller sandbox-local-executors; do
	[[ -x "$bin/$b" ]] || {
		log "missing $bin/$b after the build"
		exit 1
	}
done

if "$cluster" status >/dev/null 2>&1; then
	log "a cluster is already running in $SBX_DEV_DIR: stopping it first (the suite needs a fresh one)"
	"$cluster" down >/dev/null
fi
SBX_RUNNER_BIN="$bin/sandbox-local-executors" "$cluster" up >/dev/null
port_base="$(sed -n 's/^port_base=//p' "$SBX_DEV_DIR/cluster.env")"
kubeconfig="$SBX_DEV_DIR/kubeconfig"
"$SBX_DEV_DIR/bin/kubectl" --kubeconfig "$kubeconfig" apply --server-side --force-conflicts \
	--field-manager=sbx-chaos -f crds/ >/dev/null
"$SBX_DEV_DIR/bin/kubectl" --kubeconfig "$kubeconfig" wait --for=condition=Established \
	--timeout=60s -f crds/ >/dev/null
log "cluster up (port base $port_base); running sandbox-chaos"

# Started in the background and waited for, so the trap can stop it on INT/TERM.
SBX_RUNNER_BIN="$bin/sandbox-local-executors" timeout --signal=TERM --kill-after=30 \
	"${SBX_CHAOS_TIMEOUT:-1500}" "$bin/sandbox-chaos" \
	--kubeconfig "$kubeconfig" \
	--controller "$bin/sandbox-controller" \
	--cluster-script "$cluster" \
	--proxy-listen "127.0.0.1:$((port_base + 6))" \
	--health-ports "$((port_base + 7)),$((port_base + 8))" \
	--log-dir "$SBX_DEV_DIR/logs/chaos" \
	"$@" &
chaos_pid=$!
wait "$chaos_pid"
