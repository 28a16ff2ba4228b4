#!/usr/bin/env bash
# Local Kubernetes control plane for sandbox-controller development and tests.
#
#   deploy/local/cluster.sh up [--watch-parent PID]   start (idempotent), wait until usable
#   deploy/local/cluster.sh down                      stop everything `up`/`spawn` started, wipe cluster state
#   deploy/local/cluster.sh status                    show processes and health; exit 0 only if healthy
#   deploy/local/cluster.sh env                       print shell exports (KUBECONFIG, PATH)
#   deploy/local/cluster.sh spawn NAME -- CMD...      run CMD in the background as a managed process
#   deploy/local/cluster.sh stop NAME                 stop one managed process
#
# Components (one process each, all listening on 127.0.0.1 only): embedded
# etcd, kube-apiserver, kube-controller-manager, kube-scheduler and kwok with
# SBX_NODES fake nodes, each with a pod CIDR 127.1.<k>.0/24; then the executor
# runner (`sandbox-local-executors`), which serves task executors on
# those pod IPs (<podIP>:5758).
#
# Several instances on one machine: give each its own SBX_DEV_DIR and port
# block. Their pod CIDRs are disjoint, so their executor runners never bind the
# same <podIP>:5758: instance i (SBX_CIDR_INDEX, 0..30) gives node n the CIDR
# 127.1.<1 + 8*i + n>.0/24, all inside 127.1.0.0/16 (127.1.255.0/24 stays kwok's
# fallback). By default i is derived from the port block, (SBX_PORT_BASE/10 -
# 1644) mod 31, so the default block 16440 has 127.1.1.0/24, 127.1.2.0/24, ...
# and the blocks `up` picks when 16440 is taken (16540, 16640, ...) get
# i = 10, 20, ... An instance with more than 8 nodes spans ceil(nodes/8)
# consecutive indices; choose SBX_CIDR_INDEX for it so the ranges don't meet.
#
# Environment:
#   SBX_DEV_DIR        state directory (default <repo>/.dev); kubeconfig at $SBX_DEV_DIR/kubeconfig
#   SBX_PORT_BASE      first of 10 consecutive ports (default 16440); use another base for a 2nd instance
#   SBX_NODES          number of kwok nodes (default 2, max 200)
#   SBX_CIDR_INDEX     which pod-CIDR block this instance uses (default: derived from the port block)
#   SBX_ADVERTISE_ADDRESS  address kube-apiserver advertises (default: detected, non-loopback)
#   SBX_UP_TIMEOUT     seconds `up` waits for the cluster to come up (default 120); builds (the
#                      control-plane binary, the executor runner) happen before or outside it
#   SBX_RUNNER_BIN     prebuilt sandbox-local-executors for the executor runner (default: cargo build)
#
# Layout of $SBX_DEV_DIR: kubeconfig, bin/kubectl (matching v1.36 client),
# pki/, etcd/, logs/<process>.log, run/<process>.pid, cluster.env.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo
readonly dev="${SBX_DEV_DIR:-$repo/.dev}"
readonly pki="$dev/pki" rundir="$dev/run" logdir="$dev/logs" etcd_dir="$dev/etcd" bindir="$dev/bin"
readonly kubeconfig="$dev/kubeconfig"
readonly state_file="$dev/cluster.env"

# Control-plane components in start order; `down` stops them in reverse.
readonly COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

# Long-running local helpers that `up` starts once the cluster is ready, in
# order, and `down` stops first. To add one, append its name here and define
#   helper_cmd_<name>    sets the array CMD (the process to run, in the foreground)
#   helper_ready_<name>  optional; returns 0 once the helper is usable
# ('-' in names becomes '_' in function names). Example:
#   HELPERS+=(executor-runner)
#   helper_cmd_executor_runner() { CMD=("$repo/target/debug/executor-runner" --kubeconfig "$kubeconfig"); }
HELPERS=(executor-runner)

# kwok pods run no containers: the runner starts a real sandbox-task-executor
# for every Running pod with a task-executor container, on the pod's 127.1.x.y
# IP, port 5758, trusting the public half of $SBX_DEV_DIR/executor-signing-key
# (created if missing; the controller signs with it). SBX_RUNNER_BIN: a prebuilt sandbox-local-executors (with
# sandbox-task-executor next to it) instead of building them here.
helper_cmd_executor_runner() {
	local ctl="${SBX_RUNNER_BIN:-}"
	if [[ -z "$ctl" ]]; then
		log "building the workspace (sandbox-local-executors, sandbox-task-executor) for the executor runner" \
			"(cargo build; a first build with an empty target dir takes several minutes, not counted in SBX_UP_TIMEOUT)"
		# Every target of the workspace, as every other debug build here: any narrower selection
		# (without the tests' dev-dependencies, or without some crates) unifies dependency
		# features differently and compiles wasmtime and kube a second time.
		# SBX_CARGO_TIMINGS=1: cargo's --timings report of this (on a first run, the cold) build.
		local timings=()
		[[ "${SBX_CARGO_TIMINGS:-0}" == 1 ]] && timings=(--timings)
		ctl="$(cd "$repo" && cargo build "${timings[@]}" --workspace --all-targets \
			--message-format=json-render-diagnostics |
			sed -n 's/.*"executable":"\([^"]*sandbox-local-executors\)".*/\1/p' | tail -n1)"
	fi
	[[ -n "$ctl" && -x "$ctl" ]] || die "could not build sandbox-local-executors for the executor runner"
	# Created here, not only by the runner, so it exists once `up` returns: a hex Ed25519 seed,
	# readable by its owner only.
	[[ -s "$dev/executor-signing-key" ]] ||
		(umask 277 && od -An -N32 -tx1 /dev/urandom | tr -d ' \n' >"$dev/executor-signing-key")
	CMD=(env KUBECONFIG="$kubeconfig" "$ctl" --state-dir "$dev")
}

log() { printf '[cluster] %s\n' "$*" >&2; }
die() {
	printf '[cluster] error: %s\n' "$*" >&2
	exit 1
}

usage() {
	sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
	exit 2
}

# ---------------------------------------------------------------- settings --

load_settings() {
	# A running instance keeps the settings it was started with, whatever the
	# caller's environment says now.
	if any_running && [[ -f "$state_file" ]]; then
		# shellcheck disable=SC1090
		source "$state_file"
		if [[ -n "${SBX_PORT_BASE:-}" && "$SBX_PORT_BASE" != "$port_base" ]]; then
			[[ "${1:-}" != strict ]] || die "an instance in $dev is running with port base $port_base, not SBX_PORT_BASE=$SBX_PORT_BASE; run 'down' first or use another SBX_DEV_DIR"
			log "note: the instance in $dev runs with port base $port_base (SBX_PORT_BASE=$SBX_PORT_BASE ignored)"
		fi
	else
		port_base="${SBX_PORT_BASE:-16440}"
		nodes="${SBX_NODES:-2}"
		cidr_index="${SBX_CIDR_INDEX:-}"
	fi
	if ! [[ "$port_base" =~ ^[0-9]+$ ]] || ((port_base < 1024 || port_base > 65525)); then
		die "SBX_PORT_BASE must be a number in 1024..65525, got '$port_base'"
	fi
	if ! [[ "$nodes" =~ ^[0-9]+$ ]] || ((nodes < 1 || nodes > 200)); then
		die "SBX_NODES must be 1..200, got '$nodes'"
	fi
	derive_ports
}

# Pod CIDRs: node n of instance i gets 127.1.<cidr_first + n>.0/24 (see the header).
readonly CIDR_SLOT=8 CIDR_SLOTS=31
derive_cidrs() {
	local span=$(((nodes + CIDR_SLOT - 1) / CIDR_SLOT))
	if [[ -z "${cidr_index:-}" ]]; then
		# Spread port blocks over the slots that leave room for `span` of them.
		local slots=$((CIDR_SLOTS - span + 1))
		cidr_index=$((((port_base / 10 - 1644) % slots + slots) % slots))
	fi
	[[ "$cidr_index" =~ ^[0-9]+$ ]] || die "SBX_CIDR_INDEX must be a number in 0..$((CIDR_SLOTS - 1)), got '$cidr_index'"
	cidr_first=$((1 + CIDR_SLOT * cidr_index))
	cidr_last=$((cidr_first + nodes - 1))
	((cidr_last <= 254)) ||
		die "SBX_CIDR_INDEX=$cidr_index with $nodes node(s) needs 127.1.$cidr_first-$cidr_last.0/24, beyond 127.1.254.0/24; choose a smaller index"
}

node_cidr() { echo "127.1.$((cidr_first + $1)).0/24"; }

derive_ports() {
	port_api=$((port_base + 0))
	port_etcd=$((port_base + 1))
	port_etcd_peer=$((port_base + 2))
	port_kcm=$((port_base + 3))
	port_sched=$((port_base + 4))
	port_kwok=$((port_base + 5))
	# port_base+6/+7: the webhook and health ports of the controller dev.sh runs; +8..+9 are free
	# for helpers (see HELPERS).
	server="https://127.0.0.1:$port_api"
}

save_settings() {
	cat >"$state_file.tmp" <<EOF
port_base=$port_base
nodes=$nodes
cidr_index=$cidr_index
bin=$bin
EOF
	mv -f "$state_file.tmp" "$state_file"
}

# ------------------------------------------------------ process management --

# Pid files hold "<pid> <start time>" so a recycled pid is never mistaken for
# ours (and never killed).
proc_start_time() {
	local stat
	stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 1
	stat="${stat##*) }"
	# shellcheck disable=SC2086
	set -- $stat
	[[ "$1" != Z && "$1" != X ]] || return 1
	echo "${20}"
}

pid_of() { # prints the pid of managed process $1 if it is alive
	local f="$rundir/$1.pid" pid start
	[[ -f "$f" ]] || return 1
	read -r pid start <"$f" || return 1
	[[ -n "$pid" && "$(proc_start_time "$pid" 2>/dev/null)" == "$start" ]] || return 1
	echo "$pid"
}

running() { pid_of "$1" >/dev/null; }

any_running() {
	local f
	for f in "$rundir"/*.pid; do
		[[ -e "$f" ]] || continue
		running "$(basename "$f" .pid)" && return 0
	done
	return 1
}

# spawn_proc NAME CMD... : start CMD detached (own session, so a Ctrl-C in the
# caller's terminal does not kill it), logging to logs/NAME.log.
spawn_proc() {
	local name="$1" pid start
	shift
	mkdir -p "$rundir" "$logdir"
	[[ -f "$logdir/$name.log" ]] && mv -f "$logdir/$name.log" "$logdir/$name.log.prev"
	# fd 8 is the state-directory lock; it must not leak into long-lived children.
	setsid "$@" </dev/null >"$logdir/$name.log" 2>&1 8>&- &
	pid=$!
	start="$(proc_start_time "$pid")" || {
		wait "$pid" || true
		die "$name exited immediately; see $logdir/$name.log"
	}
	echo "$pid $start" >"$rundir/$name.pid"
	log "started $name (pid $pid, log $logdir/$name.log)"
}

stop_proc() {
	local name="$1" pid i
	if pid="$(pid_of "$name")"; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 100; i++)); do
			running "$name" || break
			sleep 0.1
		done
		if running "$name"; then
			log "$name (pid $pid) ignored SIGTERM for 10s; killing it"
			kill -KILL "$pid" 2>/dev/null || true
			sleep 0.2
		fi
		log "stopped $name (pid $pid)"
	fi
	rm -f "$rundir/$name.pid"
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

ports_free() { # ports_free BASE: none of BASE..BASE+9 accepts connections
	local p
	for ((p = $1; p < $1 + 10; p++)); do
		port_in_use "$p" && return 1
	done
	return 0
}

# ------------------------------------------------------------- components --

cmd_etcd() {
	CMD=("$bin" etcd --data-dir "$etcd_dir" --client-port "$port_etcd" --peer-port "$port_etcd_peer")
}

cmd_kube_apiserver() {
	# shellcheck disable=SC2054 # commas belong to flag values
	CMD=("$bin" kube-apiserver
		--etcd-servers "http://127.0.0.1:$port_etcd"
		--bind-address 127.0.0.1 --secure-port "$port_api"
		--advertise-address "$advertise"
		--tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key"
		--client-ca-file "$pki/ca.crt"
		--authorization-mode RBAC
		--service-account-issuer https://kubernetes.default.svc.cluster.local
		--service-account-key-file "$pki/sa.pub"
		--service-account-signing-key-file "$pki/sa.key"
		# An allocation pool only: nothing here ever connects to a Service IP.
		--service-cluster-ip-range 10.96.0.0/16
		--endpoint-reconciler-type none
		# No kubelets create default ServiceAccounts' tokens for pods, and no
		# node-lifecycle controller would ever lift the not-ready taint.
		--disable-admission-plugins ServiceAccount,TaintNodesByCondition
		--allow-privileged
		--profiling=false
		--v 1)
}

cmd_kube_controller_manager() {
	local kc="$pki/kube-controller-manager.kubeconfig"
	# shellcheck disable=SC2054 # commas belong to flag values
	CMD=("$bin" kube-controller-manager
		--kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc"
		--bind-address 127.0.0.1 --secure-port "$port_kcm"
		--controllers garbage-collector-controller,namespace-controller,serviceaccount-controller
		--use-service-account-credentials
		--root-ca-file "$pki/ca.crt"
		--leader-elect=false
		--profiling=false
		--v 1)
}

cmd_kube_scheduler() {
	local kc="$pki/kube-scheduler.kubeconfig"
	CMD=("$bin" kube-scheduler
		--kubeconfig "$kc" --authentication-kubeconfig "$kc" --authorization-kubeconfig "$kc"
		--bind-address 127.0.0.1 --secure-port "$port_sched"
		--leader-elect=false
		--profiling=false
		--v 1)
}

cmd_kwok() {
	local stages=() f
	for f in "$here"/stages/*.yaml; do stages+=(--config "$f"); done
	CMD=("$bin" kwok
		--kubeconfig "$pki/kwok.kubeconfig"
		"${stages[@]}"
		--manage-all-nodes=false
		--manage-nodes-with-annotation-selector kwok.x-k8s.io/node=fake
		# Pods on a node without spec.podCIDR; every node we create has one.
		--cidr 127.1.255.0/24
		--node-ip 127.0.0.1 --node-port "$port_kwok"
		--server-address "127.0.0.1:$port_kwok")
}

# Health probes (all local).
curl_() { curl --silent --show-error --fail --max-time 3 "$@"; }
ready_etcd() { curl_ "http://127.0.0.1:$port_etcd/health" 2>/dev/null | grep -q '"health":"true"'; }
ready_kube_apiserver() {
	[[ "$(curl_ --cacert "$pki/ca.crt" "$server/readyz" 2>/dev/null)" == ok ]]
}
ready_kube_controller_manager() { [[ "$(curl_ -k "https://127.0.0.1:$port_kcm/healthz" 2>/dev/null)" == ok ]]; }
ready_kube_scheduler() { [[ "$(curl_ -k "https://127.0.0.1:$port_sched/healthz" 2>/dev/null)" == ok ]]; }
ready_kwok() { [[ "$(curl_ "http://127.0.0.1:$port_kwok/healthz" 2>/dev/null)" == ok ]]; }

fn() { echo "$1_${2//-/_}"; }

wait_until() { # wait_until DESCRIPTION DEADLINE COMMAND...
	local what="$1" deadline="$2"
	shift 2
	until "$@"; do
		if ((SECONDS >= deadline)); then
			die "timed out waiting for $what; logs are in $logdir"
		fi
		sleep 0.2
	done
}

wait_ready() { # wait_ready NAME DEADLINE
	local name="$1" deadline="$2" probe
	probe="$(fn ready "$name")"
	declare -F "$probe" >/dev/null || return 0
	until "$probe"; do
		running "$name" || die "$name exited; last lines of $logdir/$name.log:
$(tail -n 20 "$logdir/$name.log" 2>/dev/null)"
		((SECONDS < deadline)) || die "$name not ready ${SBX_UP_TIMEOUT:-120}s after the build finished (SBX_UP_TIMEOUT); see $logdir/$name.log"
		sleep 0.2
	done
}

kctl() { "$bindir/kubectl" --kubeconfig "$pki/admin.kubeconfig" "$@"; }

node_manifests() {
	local i
	for ((i = 0; i < nodes; i++)); do
		cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-$i
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/hostname: kwok-node-$i
    kubernetes.io/os: linux
    kubernetes.io/role: agent
    node-role.kubernetes.io/agent: ""
spec:
  podCIDR: $(node_cidr "$i")
  podCIDRs: [$(node_cidr "$i")]
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "250"}
  capacity: {cpu: "32", memory: 256Gi, pods: "250"}
EOF
	done
}

# --------------------------------------------------------------- commands --

resolve_binary() {
	# The build script prints the cached binary's path (building it if needed).
	# 8>&-: a build must not inherit the state-dir lock, or killing `up`
	# mid-build would leave `down` waiting for the orphaned compiler.
	bin="$("$here/build.sh" 8>&-)" || die "building sbx-cluster failed"
	[[ -x "$bin" ]] || die "build.sh did not produce an executable: $bin"
	mkdir -p "$bindir"
	ln -sfn sbx-cluster "$(dirname "$bin")/kubectl"
	ln -sfn "$(dirname "$bin")/kubectl" "$bindir/kubectl"
	ln -sfn "$bin" "$bindir/sbx-cluster"
}

print_env() {
	echo "export KUBECONFIG=$kubeconfig"
	echo "export PATH=$bindir:\$PATH"
}

# pick_ports: when SBX_PORT_BASE is not set and nothing of this instance runs, moves to the next
# free block of 10 if the current one is taken (e.g. by the cluster of another worktree).
pick_ports() {
	if ! any_running && [[ -z "${SBX_PORT_BASE:-}" ]] && ! ports_free "$port_base"; then
		local cand
		for ((cand = port_base + 100; cand <= port_base + 4000; cand += 100)); do
			if ports_free "$cand"; then
				log "ports $port_base..$((port_base + 9)) are in use; using port base $cand (set SBX_PORT_BASE to choose)"
				port_base=$cand
				derive_ports
				return 0
			fi
		done
	fi
}

# check_ports: dies if a port of a component that is not running yet is taken.
check_ports() {
	local name p
	for name in "${COMPONENTS[@]}"; do
		running "$name" && continue
		for p in $(port_of "$name"); do
			port_in_use "$p" && die "port $p (for $name) is in use by another process; stop it or set SBX_PORT_BASE"
		done
	done
	return 0
}

cmd_up() {
	local watch_pid=""
	while (($#)); do
		case "$1" in
		--watch-parent)
			[[ $# -ge 2 && "$2" =~ ^[0-9]+$ ]] || die "--watch-parent needs a pid"
			watch_pid="$2"
			shift 2
			;;
		*) die "up: unknown argument '$1'" ;;
		esac
	done
	command -v curl >/dev/null || die "curl is required (apt-get install curl)"
	command -v setsid >/dev/null || die "setsid is required (util-linux)"

	mkdir -p "$dev" "$rundir" "$logdir"
	exec 8>"$dev/cluster.lock"
	flock 8 # one up/down at a time per state directory
	load_settings strict

	local t0=$SECONDS deadline started_any=0 name

	if running kube-apiserver && ready_kube_apiserver; then
		local all=1
		for name in "${COMPONENTS[@]}" "${HELPERS[@]}"; do running "$name" || all=0; done
		if ((all)) && [[ -f "$kubeconfig" ]]; then
			log "already running (port base $port_base)"
			[[ -z "$watch_pid" ]] || log "not watching pid $watch_pid: this cluster was started by someone else"
			print_env
			return 0
		fi
	fi

	# Ports are checked before the build, so a clash fails at once rather than after a
	# 10-minute first build, and again after it, as another cluster may have started meanwhile.
	pick_ports
	check_ports
	# The first run builds the control plane (~10 min cold): that must not eat the deadline.
	resolve_binary
	local t_built=$SECONDS
	deadline=$((SECONDS + ${SBX_UP_TIMEOUT:-120}))
	pick_ports
	check_ports
	derive_cidrs
	save_settings

	if [[ -n "${SBX_ADVERTISE_ADDRESS:-}" ]]; then
		advertise="$SBX_ADVERTISE_ADDRESS"
	else
		advertise="$("$bin" advertise-address)" || die "could not determine an advertise address; set SBX_ADVERTISE_ADDRESS"
	fi
	"$bin" certs --dir "$pki" --server "$server" --ip "$advertise" || die "certificate generation failed"

	for name in "${COMPONENTS[@]}"; do
		if ! running "$name"; then
			local CMD=()
			"$(fn cmd "$name")"
			spawn_proc "$name" "${CMD[@]}"
			started_any=1
		fi
		wait_ready "$name" "$deadline"
		if [[ "$name" == kube-apiserver ]]; then
			install -m 0600 "$pki/admin.kubeconfig" "$kubeconfig.tmp" && mv -f "$kubeconfig.tmp" "$kubeconfig"
		fi
	done

	node_manifests | kctl apply --server-side --field-manager=sbx-cluster -f - >/dev/null ||
		die "could not create kwok nodes"
	wait_until "$nodes Ready kwok node(s)" "$deadline" nodes_ready
	wait_until "the default ServiceAccount" "$deadline" kctl get serviceaccount default -n default -o name --request-timeout=3s >/dev/null 2>&1

	for name in "${HELPERS[@]}"; do
		if ! running "$name"; then
			local CMD=()
			local b0=$SECONDS
			"$(fn helper_cmd "$name")" 8>&- # may build; see resolve_binary
			# A build in helper_cmd does not count against SBX_UP_TIMEOUT either.
			deadline=$((deadline + SECONDS - b0))
			t_built=$((t_built + SECONDS - b0))
			spawn_proc "$name" "${CMD[@]}"
		fi
		local probe
		probe="$(fn helper_ready "$name")"
		if declare -F "$probe" >/dev/null; then wait_until "$name" "$deadline" "$probe"; fi
	done

	if [[ -n "$watch_pid" ]]; then
		if ((started_any)); then
			stop_proc watch-parent
			spawn_proc watch-parent "$bin" watch-parent --pid "$watch_pid" -- "$here/cluster.sh" down
			log "will tear down when pid $watch_pid exits"
		else
			log "not watching pid $watch_pid: the control plane was already running"
		fi
	fi
	log "ready in $((SECONDS - t0))s ($((t_built - t0))s building, $((SECONDS - t_built))s starting): apiserver $server," \
		"$nodes kwok node(s) with pod CIDRs $(node_cidr 0)..$(node_cidr $((nodes - 1))) (SBX_CIDR_INDEX=$cidr_index), kubeconfig $kubeconfig"
	print_env
}

nodes_ready() {
	local n
	n="$(kctl get nodes -l type=kwok --request-timeout=3s \
		-o jsonpath='{range .items[*]}{.status.conditions[?(@.type=="Ready")].status}{"\n"}{end}' 2>/dev/null |
		grep -c '^True$')" || true
	((n >= nodes))
}

port_of() {
	case "$1" in
	etcd) echo "$port_etcd $port_etcd_peer" ;;
	kube-apiserver) echo "$port_api" ;;
	kube-controller-manager) echo "$port_kcm" ;;
	kube-scheduler) echo "$port_sched" ;;
	kwok) echo "$port_kwok" ;;
	esac
}

cmd_down() {
	mkdir -p "$dev"
	exec 8>"$dev/cluster.lock"
	flock 8
	local f name i
	# Extra processes started with `spawn` (e.g. the controller of `make dev-up`)
	# and helpers go first, then the control plane in reverse start order.
	local ordered=()
	for f in "$rundir"/*.pid; do
		[[ -e "$f" ]] || continue
		name="$(basename "$f" .pid)"
		[[ " ${COMPONENTS[*]} watch-parent " == *" $name "* ]] || ordered+=("$name")
	done
	for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do ordered+=("${COMPONENTS[i]}"); done
	# The watcher runs `down` itself when its pid exits; don't kill our own parent.
	local wpid
	if wpid="$(pid_of watch-parent)" && [[ "$wpid" != "$PPID" ]]; then
		stop_proc watch-parent
	fi
	for name in "${ordered[@]}"; do stop_proc "$name"; done
	rm -f "$rundir/watch-parent.pid"
	# The cluster is ephemeral: drop its data so the next `up` starts clean.
	# PKI is kept so kubeconfigs handed out earlier stay valid.
	rm -rf "$etcd_dir" "$state_file"
	log "down"
}

cmd_status() {
	[[ -d "$dev" ]] || {
		echo "not running (no $dev)"
		return 1
	}
	load_settings
	local healthy=0 name f pid probe
	for f in "$rundir"/*.pid; do
		[[ -e "$f" ]] || continue
		name="$(basename "$f" .pid)"
		if pid="$(pid_of "$name")"; then
			probe="$(fn ready "$name")"
			if declare -F "$probe" >/dev/null; then
				if "$probe"; then echo "$name: running (pid $pid), healthy"; else
					echo "$name: running (pid $pid), NOT healthy"
					healthy=1
				fi
			else
				echo "$name: running (pid $pid)"
			fi
		else
			echo "$name: not running (stale pid file)"
		fi
	done
	for name in "${COMPONENTS[@]}"; do
		running "$name" || {
			echo "$name: not running"
			healthy=1
		}
	done
	if ((healthy == 0)); then
		derive_cidrs
		echo "apiserver: $server (port base $port_base)"
		echo "pod CIDRs: $(node_cidr 0) .. $(node_cidr $((nodes - 1))) (SBX_CIDR_INDEX=$cidr_index)"
		echo "kubeconfig: $kubeconfig"
		kctl get nodes -o wide 2>/dev/null || true
	fi
	return "$healthy"
}

cmd_spawn() {
	local name="${1:-}"
	[[ "$name" =~ ^[a-z0-9][a-z0-9-]*$ ]] || die "spawn: NAME must match [a-z0-9-]+"
	shift
	[[ "${1:-}" == -- ]] || die "usage: spawn NAME -- CMD..."
	shift
	(($#)) || die "spawn: missing command"
	[[ " ${COMPONENTS[*]} watch-parent " != *" $name "* ]] || die "spawn: '$name' is reserved"
	mkdir -p "$dev"
	exec 8>"$dev/cluster.lock"
	flock 8
	if running "$name"; then
		log "$name already running (pid $(pid_of "$name"))"
		return 0
	fi
	spawn_proc "$name" "$@"
}

main() {
	local sub="${1:-}"
	(($#)) && shift
	case "$sub" in
	up) cmd_up "$@" ;;
	down) cmd_down ;;
	status) cmd_status ;;
	env)
		load_settings
		print_env
		;;
	spawn) cmd_spawn "$@" ;;
	stop)
		[[ -n "${1:-}" ]] || die "usage: stop NAME"
		mkdir -p "$dev"
		exec 8>"$dev/cluster.lock"
		flock 8
		stop_proc "$1"
		;;
	*) usage ;;
	esac
}

main "$@"
