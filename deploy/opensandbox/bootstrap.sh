#!/bin/sh
# /opt/opensandbox/bootstrap.sh for sandboxes whose in-sandbox command API (port 44772) is served
# by sandbox-task-executor. OpenSandbox's server starts every sandbox's entrypoint through this
# path (template mode: the container command; pool mode: the task
# `/bin/sh -c "exec /opt/opensandbox/bootstrap.sh <entrypoint>"`). OpenSandbox's own script first
# starts its execd daemon in the background; here the executor already serves that API, so the
# script only runs the entrypoint, in place, and its exit status is the sandbox's.
#
#   bootstrap.sh CMD [ARGS...]      runs CMD with ARGS
#   bootstrap.sh -c "shell text"    runs the text with bash (or sh)
#   BOOTSTRAP_CMD="shell text"      the same, taking precedence
#   bootstrap.sh                    an interactive-less shell, like OpenSandbox's
set -e

shell="${BOOTSTRAP_SHELL:-}"
if [ -z "$shell" ]; then
	if command -v bash >/dev/null 2>&1; then
		shell="$(command -v bash)"
	else
		shell="$(command -v sh)"
	fi
fi

if [ -n "${BOOTSTRAP_CMD:-}" ]; then
	set -- "$shell" -c "$BOOTSTRAP_CMD"
elif [ $# -ge 1 ] && [ "$1" = "-c" ]; then
	shift
	set -- "$shell" -c "$*"
elif [ $# -eq 0 ]; then
	set -- "$shell"
fi

exec "$@"
