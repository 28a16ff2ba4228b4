#!/usr/bin/env bash
# Developer workflows on top of cluster.sh; the Makefile's dev targets call this.
#
#   deploy/local/dev.sh fg     cluster + CRDs + controller in the foreground; Ctrl-C tears it all down
#   deploy/local/dev.sh up     the same in the background (controller pid/log in .dev/run, .dev/logs)
#   deploy/local/dev.sh down   stop the controller and the cluster
#   deploy/local/dev.sh test [cargo test args...]
#                              run every test against one cluster; a cluster this command
#                              started is stopped on exit, a running one (make dev) is reused
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo
readonly dev="${SBX_DEV_DIR:-$repo/.dev}"
readonly cluster="$here/cluster.sh"
readonly kubeconfig="$dev/kubeconfig"

log() { printf '[dev] %s\n' "$*" >&2; }
die() {
	printf '[dev] error: %s\n' "$*" >&2
	exit 1
}

command -v cargo >/dev/null || die "cargo not found on PATH"

# SBX_CARGO_TIMINGS=1 adds --timings to the builds: cargo writes an HTML report of where the
# build time went to $CARGO_TARGET_DIR/cargo-timings (make fresh-machine summarises it).
cargo_build_flags=()
[[ "${SBX_CARGO_TIMINGS:-0}" == 1 ]] && cargo_build_flags+=(--timings)

# Started cluster only when it was not running before, so that a developer's
# `make dev` cluster survives `make test`.
started_cluster=0
cluster_up() {
	if "$cluster" status >/dev/null 2>&1; then
		log "reusing the running cluster in $dev"
	else
		started_cluster=1
	fi
	# Idempotent: prints the env exports; a no-op when everything runs already.
	"$cluster" up >/dev/null
	export KUBECONFIG="$kubeconfig"
	export PATH="$dev/bin:$PATH"
}

apply_crds() {
	shopt -s nullglob
	local files=("$repo"/crds/*.yaml)
	shopt -u nullglob
	if ((${#files[@]} == 0)); then
		log "crds/ is empty; generate the CRDs with 'make crds'"
		return 0
	fi
	# Server-side: the CRDs embed the PodTemplateSpec schema and outgrow the
	# 256 KiB last-applied annotation of a client-side apply.
	kubectl apply --server-side --force-conflicts --field-manager=sbx-dev -f "$repo/crds/" >/dev/null
	kubectl wait --for=condition=Established --timeout=60s -f "$repo/crds/" >/dev/null
	log "CRDs installed from crds/"
}

# Builds sandbox-controller and prints the path of the binary.
build_controller() {
	log "building sandbox-controller"
	local bin
	bin="$(cd "$repo" && cargo build "${cargo_build_flags[@]}" --workspace --all-targets --message-format=json-render-diagnostics |
		sed -n 's/.*"executable":"\([^"]*sandbox-controller\)".*/\1/p' | tail -n1)"
	[[ -n "$bin" && -x "$bin" ]] || die "could not build sandbox-controller"
	echo "$bin"
}

# How the local controller runs: it signs executor requests with the runner's key, the
# admission webhook is registered at https://127.0.0.1:<port base + 6>, health and metrics are on
# http://127.0.0.1:<port base + 7> (the cluster's helper ports, so controllers of several local
# clusters never collide), and custom policies load from .dev/policies (*.wasm) or from
# ConfigMaps in the default namespace, without a restart. Call after cluster_up.
set_controller_args() {
	local port_base
	port_base="$(sed -n 's/^port_base=//p' "$dev/cluster.env" 2>/dev/null)"
	[[ "$port_base" =~ ^[0-9]+$ ]] || die "no port base in $dev/cluster.env; is the cluster up?"
	mkdir -p "$dev/policies"
	controller_args=(
		--executor-signing-key-file "$dev/executor-signing-key"
		--webhook --webhook-listen "127.0.0.1:$((port_base + 6))"
		--webhook-cert-dir "$dev/webhook-certs" --controller-namespace kube-system
		--health-addr "127.0.0.1:$((port_base + 7))"
		--policy-dir "$dev/policies" --policy-namespace default
	)
	log "controller: webhook https://127.0.0.1:$((port_base + 6)), health http://127.0.0.1:$((port_base + 7))/readyz"
}

# cluster.sh writes the signing key when it starts the executor runner; wait for it (briefly)
# before the controller reads it.
wait_for_token() {
	local i
	for ((i = 0; i < 100; i++)); do
		[[ -s "$dev/executor-signing-key" ]] && return 0
		sleep 0.1
	done
	die "$dev/executor-signing-key did not appear; is the executor runner running? (.dev/logs/executor-runner.log)"
}

# True once the controller binary has a `run` subcommand.
can_run() { "$1" run --help >/dev/null 2>&1; }

print_usage_hint() {
	cat >&2 <<EOF

  The local control plane is up. In another shell:

    export KUBECONFIG=$kubeconfig
    export PATH=$dev/bin:\$PATH      # kubectl v1.36, matching the apiserver

EOF
}

cmd_fg() {
	trap 'if ((started_cluster)); then "$cluster" down; else log "leaving the cluster running (it was up before make dev)"; fi' EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	cluster_up
	apply_crds
	print_usage_hint
	local bin
	bin="$(build_controller)"
	if can_run "$bin"; then
		set_controller_args
		log "running the controller in the foreground (Ctrl-C stops it and the cluster); log level via RUST_LOG"
		wait_for_token
		KUBECONFIG="$kubeconfig" "$bin" run "${controller_args[@]}" || log "controller exited with status $?"
	else
		log "sandbox-controller has no 'run' subcommand yet; only the cluster runs. Ctrl-C to stop."
		while :; do sleep 3600 & wait $! || true; done
	fi
}

cmd_up() {
	cluster_up
	apply_crds
	local bin
	bin="$(build_controller)"
	if can_run "$bin"; then
		set_controller_args
		wait_for_token
		"$cluster" spawn controller -- env KUBECONFIG="$kubeconfig" "$bin" run "${controller_args[@]}"
		log "controller running in the background; log: $dev/logs/controller.log"
	else
		log "sandbox-controller has no 'run' subcommand yet; started the cluster only"
	fi
	print_usage_hint
	"$cluster" env
}

cmd_down() {
	"$cluster" down
}

cmd_test() {
	cleanup() {
		local rc=$?
		if ((started_cluster)); then "$cluster" down || true; fi
		exit "$rc"
	}
	trap cleanup EXIT
	trap 'exit 130' INT
	trap 'exit 143' TERM
	cluster_up
	# The harness (tests/e2e/harness.rs) uses exactly this cluster.
	export SBX_KUBECONFIG="$kubeconfig"
	# Every binary of the workspace: the e2e tests run the executor and the runner next to the
	# controller they test (tests/e2e/harness.rs finds them beside it).
	log "building every target (cargo build --workspace --all-targets)"
	(cd "$repo" && cargo build "${cargo_build_flags[@]}" --workspace --all-targets)
	log "running: cargo test $*"
	(cd "$repo" && cargo test "$@")
}

sub="${1:-}"
(($#)) && shift
case "$sub" in
fg) cmd_fg "$@" ;;
up) cmd_up "$@" ;;
down) cmd_down "$@" ;;
test) cmd_test "$@" ;;
*)
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
	exit 2
	;;
esac
