#!/usr/bin/env bash
# Builds the two container images (make image):
#
#   sandbox-controller:<version>      deploy/images/controller.Containerfile
#   sandbox-task-executor:<version>   deploy/images/executor.Containerfile
#
# Both binaries are built in release for x86_64-unknown-linux-musl, so they are statically linked
# and the images start FROM scratch: nothing is pulled from a registry. <version> is the
# binaries' own (--version). The image tool is the first of buildah, podman and docker (with a
# reachable daemon) that works, or IMAGE_BUILDER.
#
# Environment:
#   IMAGE_BUILDER    buildah | podman | docker (default: detected)
#   IMAGE_PREFIX     prepended to the image names, e.g. registry.example/opensandbox/ (default none)
#   IMAGE_TAG        tag instead of the version
#   EXECUTOR_BASE    base image of the executor image (default scratch, with static busybox and
#                    bash from Debian's busybox-static and bash-static packages)
#   IMAGE_SMOKE_TEST 0 skips running each image's binary after the build (default 1)
#   CARGO_TARGET_DIR as for cargo (default <repo>/target)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
readonly here repo
readonly target=x86_64-unknown-linux-musl
readonly uid=65532

log() { printf '[image] %s\n' "$*" >&2; }
die() {
	printf '[image] error: %s\n' "$*" >&2
	exit 1
}

# ------------------------------------------------------------------ builder --
builder_works() {
	case "$1" in
	buildah | podman) command -v "$1" >/dev/null 2>&1 && "$1" info >/dev/null 2>&1 ;;
	docker) command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1 ;;
	*) return 1 ;;
	esac
}

builder="${IMAGE_BUILDER:-}"
if [[ -n "$builder" ]]; then
	builder_works "$builder" || die "IMAGE_BUILDER=$builder does not work here ('$builder info' failed)"
else
	for candidate in buildah podman docker; do
		if builder_works "$candidate"; then
			builder="$candidate"
			break
		fi
	done
fi
if [[ -z "$builder" ]]; then
	cat >&2 <<'MSG'
[image] error: no image builder found. Install one of:
  apt-get install buildah        # daemonless, works as root without any service (used here)
  apt-get install podman
  docker, with its daemon running (`docker info` must succeed; a docker client alone is not enough)
or set IMAGE_BUILDER.
MSG
	exit 1
fi
log "image builder: $builder ($("$builder" --version 2>/dev/null | head -n1))"

# --------------------------------------------------------------- toolchain --
command -v cargo >/dev/null || die "cargo not found on PATH"
if command -v rustup >/dev/null 2>&1 && ! rustup target list --installed | grep -qx "$target"; then
	die "the Rust target $target is missing: rustup target add $target"
fi
# ring and other C parts need a C compiler for musl.
command -v musl-gcc >/dev/null 2>&1 || die "musl-gcc not found: apt-get install musl-tools"
export CC_x86_64_unknown_linux_musl="${CC_x86_64_unknown_linux_musl:-musl-gcc}"

is_static() { # is_static FILE: an ELF executable that needs no shared libraries
	[[ -x "$1" ]] && ! LC_ALL=C ldd "$1" 2>/dev/null | grep -q '=>'
}

executor_base="${EXECUTOR_BASE:-scratch}"
if [[ "$executor_base" == scratch ]]; then
	for tool in /bin/busybox:busybox-static /bin/bash-static:bash-static; do
		is_static "${tool%%:*}" ||
			die "${tool%%:*} is missing or not statically linked: apt-get install ${tool##*:}"
	done
fi

# ------------------------------------------------------------------ binaries --
log "cargo build --release --target $target (a first build takes 20+ minutes on 2 cores; 75 were measured with other builds running)"
t0=$(date +%s)
mapfile -t built < <(cd "$repo" && cargo build --release --locked --target "$target" \
	--bin sandbox-controller --bin sandbox-task-executor --message-format=json-render-diagnostics |
	sed -n 's/.*"executable":"\([^"]*\)".*/\1/p')
controller="" executor=""
for exe in "${built[@]}"; do
	case "$(basename "$exe")" in
	sandbox-controller) controller="$exe" ;;
	sandbox-task-executor) executor="$exe" ;;
	esac
done
[[ -n "$controller" && -n "$executor" ]] || die "cargo did not report both binaries (got: ${built[*]:-nothing})"
for exe in "$controller" "$executor"; do
	is_static "$exe" || die "$exe is not statically linked"
done
log "built in $(($(date +%s) - t0))s: $controller ($(du -h "$controller" | cut -f1)), $executor ($(du -h "$executor" | cut -f1))"

version="$("$controller" --version | awk '{print $2}')"
[[ -n "$version" ]] || die "could not read the version from $controller --version"
tag="${IMAGE_TAG:-$version}"
prefix="${IMAGE_PREFIX:-}"

# ---------------------------------------------------------- build contexts --
work="$(mktemp -d "${TMPDIR:-/tmp}/sbx-image.XXXXXX")"
trap 'rm -rf "$work"' EXIT

passwd_files() { # passwd_files ROOTFS: an unprivileged user and group for uid/gid 65532
	mkdir -p "$1/etc"
	printf 'root:x:0:0:root:/:/sbin/nologin\nsandbox:x:%s:%s:sandbox:/tmp:/sbin/nologin\n' "$uid" "$uid" >"$1/etc/passwd"
	printf 'root:x:0:\nsandbox:x:%s:\n' "$uid" >"$1/etc/group"
}

ctl_ctx="$work/controller"
mkdir -p "$ctl_ctx/rootfs/usr/local/bin" "$ctl_ctx/rootfs/tmp"
chmod 1777 "$ctl_ctx/rootfs/tmp"
install -m 0755 "$controller" "$ctl_ctx/rootfs/usr/local/bin/sandbox-controller"
passwd_files "$ctl_ctx/rootfs"

exe_ctx="$work/executor"
mkdir -p "$exe_ctx/rootfs/usr/local/bin" "$exe_ctx/data"
install -m 0755 "$executor" "$exe_ctx/rootfs/usr/local/bin/sandbox-task-executor"
# Pool-mode sandboxes of OpenSandbox's server start their entrypoint through this path.
install -D -m 0755 "$repo/deploy/opensandbox/bootstrap.sh" "$exe_ctx/rootfs/opt/opensandbox/bootstrap.sh"
if [[ "$executor_base" == scratch ]]; then
	mkdir -p "$exe_ctx/rootfs/bin" "$exe_ctx/rootfs/tmp"
	chmod 1777 "$exe_ctx/rootfs/tmp"
	install -m 0755 /bin/busybox "$exe_ctx/rootfs/bin/busybox"
	install -m 0755 /bin/bash-static "$exe_ctx/rootfs/bin/bash"
	while read -r applet; do
		[[ -e "$exe_ctx/rootfs/bin/$applet" ]] || ln -s busybox "$exe_ctx/rootfs/bin/$applet"
	done < <(/bin/busybox --list)
	ln -s /bin "$exe_ctx/rootfs/usr/bin"
	passwd_files "$exe_ctx/rootfs"
fi

# ------------------------------------------------------------------- images --
build_image() { # build_image NAME CONTAINERFILE CONTEXT [BUILD-ARG...]
	local name="$1" file="$2" ctx="$3"
	shift 3
	local args=(--file "$file" --tag "$name" --build-arg "VERSION=$version")
	local a
	for a in "$@"; do args+=(--build-arg "$a"); done
	case "$builder" in
	buildah) buildah build --isolation chroot --layers=false "${args[@]}" "$ctx" ;;
	podman) podman build "${args[@]}" "$ctx" ;;
	docker) docker build "${args[@]}" "$ctx" ;;
	esac >&2
}

controller_image="${prefix}sandbox-controller:$tag"
executor_image="${prefix}sandbox-task-executor:$tag"
build_image "$controller_image" "$here/controller.Containerfile" "$ctl_ctx"
build_image "$executor_image" "$here/executor.Containerfile" "$exe_ctx" "BASE=$executor_base"

# ------------------------------------------------------------- smoke check --
# Each image starts its binary as the unprivileged user. buildah runs it in a chroot, which works
# where a container runtime cannot (podman and docker share its image store on the same host).
run_in() { # run_in IMAGE CMD...
	local image="$1"
	shift
	if [[ "$builder" != docker ]] && command -v buildah >/dev/null 2>&1; then
		local c rc=0
		c="$(buildah from --pull-never "$image")"
		buildah run --isolation chroot "$c" -- "$@" || rc=$?
		buildah rm "$c" >/dev/null
		return "$rc"
	fi
	"$builder" run --rm --read-only --user "$uid:$uid" --entrypoint "$1" "$image" "${@:2}"
}
if [[ "${IMAGE_SMOKE_TEST:-1}" == 1 ]]; then
	smoke_failed() { die "the image $1 did not run (IMAGE_SMOKE_TEST=0 skips this check)"; }
	run_in "$controller_image" /usr/local/bin/sandbox-controller --version >&2 || smoke_failed "$controller_image"
	run_in "$executor_image" /usr/local/bin/sandbox-task-executor --version >&2 || smoke_failed "$executor_image"
	if [[ "$executor_base" == scratch ]]; then
		# shellcheck disable=SC2016 # expanded by the image's bash
		run_in "$executor_image" /bin/bash -c 'echo "uid $(id -u): $(sh -c "echo sh") $(sleep 0 && echo ok)"' >&2 ||
			smoke_failed "$executor_image"
	fi
fi

size_of() {
	case "$builder" in
	buildah | podman) "$builder" images --format '{{.Size}}' "$1" | head -n1 ;;
	docker) docker image inspect --format '{{.Size}}' "$1" ;;
	esac
}
log "built $controller_image ($(size_of "$controller_image")) and $executor_image ($(size_of "$executor_image"))"
echo "$controller_image"
echo "$executor_image"
