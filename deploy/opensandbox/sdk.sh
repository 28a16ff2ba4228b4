#!/usr/bin/env bash
# OpenSandbox's own lifecycle server (opensandbox-server, PyPI) next to the local control plane,
# and its Python SDK (opensandbox), so OpenSandbox's examples run unchanged against `make dev`.
#
#   deploy/opensandbox/sdk.sh up       install both packages (cached), start the server on
#                                      127.0.0.1 as a managed process of cluster.sh, print the
#                                      exports for the SDK (stdout; everything else goes to stderr)
#   deploy/opensandbox/sdk.sh env      print the exports again
#   deploy/opensandbox/sdk.sh down     stop the server (cluster.sh down stops it too)
#   deploy/opensandbox/sdk.sh venv     install (or find) the virtual environment; print its path
#   deploy/opensandbox/sdk.sh config FILE --port P --namespace NS --kubeconfig K --state DIR --api-key KEY
#                                      write a server configuration for that cluster
#
# Environment:
#   SBX_DEV_DIR     state directory of the local control plane (default <repo>/.dev)
#   SBX_SDK_CACHE   where virtual environments are kept (default ~/.cache/sbx-sdk)
#   SBX_PYTHON      the Python interpreter to build them from (default python3; 3.10 or newer)
#   SBX_SDK_NAMESPACE  namespace the server creates BatchSandboxes in (default "default", where the
#                   spec's pool.yaml puts fast-pool)
#
# The server listens on 127.0.0.1:<port base + 8> (the cluster's block of ports, see cluster.sh);
# its state (config, API key, SQLite store) lives in $SBX_DEV_DIR/opensandbox.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo
readonly dev="${SBX_DEV_DIR:-$repo/.dev}"
readonly cluster="$repo/deploy/local/cluster.sh"
readonly state="$dev/opensandbox"
readonly requirements="$here/requirements.txt"
readonly cache="${SBX_SDK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/sbx-sdk}"
readonly python="${SBX_PYTHON:-python3}"
readonly namespace="${SBX_SDK_NAMESPACE:-default}"
# The name a managed process of cluster.sh gets (logs/opensandbox-server.log, run/...pid).
readonly proc=opensandbox-server

log() { printf '[sdk] %s\n' "$*" >&2; }
die() {
	printf '[sdk] error: %s\n' "$*" >&2
	exit 1
}

usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
	exit 2
}

# ------------------------------------------------------------------ venv --

# Prints the path of a virtual environment with requirements.txt installed. Environments are
# keyed by the requirements and the interpreter's version, built once (under a lock, so parallel
# tests share one build) and marked complete only when pip succeeded.
cmd_venv() {
	command -v "$python" >/dev/null || die "$python not found; install Python 3.10+ or set SBX_PYTHON"
	"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' ||
		die "$python is older than 3.10; opensandbox 1.1.1 needs 3.10+ (set SBX_PYTHON)"
	"$python" -c 'import venv, ensurepip' 2>/dev/null ||
		die "$python cannot create virtual environments (Debian: apt-get install python3-venv)"
	local key dir
	key="$({
		cat "$requirements"
		"$python" -c 'import sys, platform; print(sys.version, platform.machine())'
	} | sha256sum | cut -c1-16)"
	dir="$cache/$key"
	mkdir -p "$cache"
	exec 9>"$cache/.lock"
	flock 9
	if [[ ! -f "$dir/.complete" ]]; then
		rm -rf "$dir"
		log "installing opensandbox and opensandbox-server from PyPI into $dir (once; about a minute)"
		"$python" -m venv "$dir" >&2
		"$dir/bin/python" -m pip install --quiet --no-input --disable-pip-version-check \
			-r "$requirements" >&2 ||
			die "pip install -r $requirements failed (see above)"
		touch "$dir/.complete"
	fi
	exec 9>&-
	echo "$dir"
}

# ---------------------------------------------------------------- config --

# TOML string: JSON quoting is valid TOML basic-string quoting for these values.
toml_str() { "$python" -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"; }

cmd_config() {
	local out="${1:-}" port="" ns="" kubeconfig="" dir="" api_key=""
	[[ -n "$out" ]] || usage
	shift
	while (($#)); do
		case "$1" in
		--port) port="$2" ;;
		--namespace) ns="$2" ;;
		--kubeconfig) kubeconfig="$2" ;;
		--state) dir="$2" ;;
		--api-key) api_key="$2" ;;
		*) die "config: unknown option $1" ;;
		esac
		shift 2
	done
	[[ "$port" =~ ^[0-9]+$ && -n "$ns" && -n "$kubeconfig" && -n "$dir" && -n "$api_key" ]] ||
		die "config needs --port, --namespace, --kubeconfig, --state and --api-key"
	mkdir -p "$dir"
	cat >"$out.tmp" <<EOF
# opensandbox-server 1.1.1 against the local control plane (written by deploy/opensandbox/sdk.sh).

[server]
# Loopback only; clients send the key as OPEN-SANDBOX-API-KEY.
host = "127.0.0.1"
port = $port
api_key = $(toml_str "$api_key")

[log]
level = "INFO"

[runtime]
type = "kubernetes"
# Named in the execd-installer init container of template-mode sandboxes; kwok pulls nothing, and
# locally the executor runner serves the in-sandbox command API (port 44772) instead.
execd_image = "opensandbox/execd:v1.1.0"

[store]
type = "sqlite"
path = $(toml_str "$dir/opensandbox.db")

[kubernetes]
# The server ignores \$KUBECONFIG; it must be named here.
kubeconfig_path = $(toml_str "$kubeconfig")
namespace = $(toml_str "$ns")
workload_provider = "batchsandbox"
sandbox_create_timeout_seconds = 60
# Only fast-sandbox ("fsb-") sandboxes use it; its default is an in-cluster DNS name. Nothing
# listens here: it stays on loopback.
fastpath_endpoint = "127.0.0.1:9"

[ingress]
mode = "direct"
EOF
	mv -f "$out.tmp" "$out"
}

# ---------------------------------------------------------------- server --

# The port base of the running cluster (cluster.sh writes it to cluster.env on `up`).
port_base() {
	[[ -f "$dev/cluster.env" ]] || die "no local control plane in $dev; start it first (make dev or make dev-up)"
	local base
	base="$(sed -n 's/^port_base=//p' "$dev/cluster.env")"
	[[ "$base" =~ ^[0-9]+$ ]] || die "cannot read port_base from $dev/cluster.env"
	echo "$base"
}

print_env() {
	local port key venv
	port=$(($(port_base) + 8))
	key="$(cat "$state/api-key")"
	venv="$(cat "$state/venv")"
	cat <<EOF
export SANDBOX_DOMAIN=127.0.0.1:$port
export SANDBOX_API_KEY=$key
export OPENSANDBOX_DISABLE_METRICS=1
export PATH=$venv/bin:\$PATH
EOF
}

# The managed process is alive (its pid file names a live process).
server_alive() {
	local pid
	pid="$(cut -d' ' -f1 "$dev/run/$proc.pid" 2>/dev/null)" && [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

healthy() { curl --silent --fail --max-time 2 "http://127.0.0.1:$1/health" >/dev/null 2>&1; }

cmd_up() {
	"$cluster" status >/dev/null 2>&1 ||
		die "the local control plane in $dev is not running; start it with 'make dev' (or 'make dev-up')"
	local venv port
	venv="$(cmd_venv)"
	port=$(($(port_base) + 8))
	mkdir -p "$state"
	[[ -s "$state/api-key" ]] ||
		(umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$state/api-key")
	echo "$venv" >"$state/venv"
	cmd_config "$state/config.toml" --port "$port" --namespace "$namespace" \
		--kubeconfig "$dev/kubeconfig" --state "$state" --api-key "$(cat "$state/api-key")"
	if ! healthy "$port"; then
		"$cluster" spawn "$proc" -- \
			"$venv/bin/opensandbox-server" --config "$state/config.toml"
		local i
		for ((i = 0; i < 300; i++)); do
			healthy "$port" && break
			server_alive || die "$proc exited; see $dev/logs/$proc.log"
			sleep 0.1
		done
		healthy "$port" || die "$proc did not answer on 127.0.0.1:$port within 30 s; see $dev/logs/$proc.log"
	fi
	log "opensandbox-server on http://127.0.0.1:$port (namespace $namespace, log $dev/logs/$proc.log)"
	log "then: python examples/sdk/batch_example.py"
	print_env
}

cmd_env() {
	[[ -f "$state/venv" && -f "$state/api-key" ]] || die "the server was never started here; run 'make sdk'"
	print_env
}

cmd_down() {
	"$cluster" stop "$proc"
}

sub="${1:-}"
(($#)) && shift
case "$sub" in
up) cmd_up "$@" ;;
env) cmd_env "$@" ;;
down) cmd_down "$@" ;;
venv) cmd_venv "$@" ;;
config) cmd_config "$@" ;;
*) usage ;;
esac
