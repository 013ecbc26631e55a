#!/usr/bin/env bash
# Builds UniDesk's container images on a machine that can pull nothing
# from any registry: every image starts FROM a local debian:bookworm-slim
# made here from Debian's own packages.
#
#   bash ops/images.sh                         # release binaries
#   UNIDESK_IMAGE_PROFILE=debug bash ops/images.sh   # debug binaries, stripped (fast, for CI)
#   bash ops/images.sh --profile debug --only agent --tag 0.1.0-next
#
# Steps:
#   1. debian:bookworm-slim, unless that tag exists: `debootstrap
#      --variant=minbase bookworm` into a temporary directory, imported with
#      `docker import` (needs root and debootstrap; DEBIAN_MIRROR picks the
#      mirror).
#   2. the binaries, with cargo: `--release` by default. With the debug
#      profile (UNIDESK_IMAGE_PROFILE=debug or --profile debug) the debug
#      binaries are used instead, stripped of their debug info: no release
#      build to wait for, at the price of slower binaries. Never deploy
#      those.
#   3. the images, each tagged VERSION (the workspace's Cargo version) and
#      VERSION-<short git commit>, with OCI labels:
#        unidesk/server    the `unidesk` binary (every server role, the
#                          object store, the admin commands, backups)
#        unidesk/agent     `unidesk-agent`
#        unidesk/gateway   Caddy from Debian: TLS, HTTP/2, the proxy
#        unidesk/postgres  PostgreSQL from Debian
#        unidesk/git       a `git daemon`, for the deployment test
#
# Options:
#   --profile release|debug   which binaries (UNIDESK_IMAGE_PROFILE)
#   --only NAME[,NAME…]       only these images (server, agent, gateway,
#                             postgres, git); the base image is always checked
#   --tag TAG                 tag the images TAG instead of VERSION and
#                             VERSION-<commit> (repeatable), such as a
#                             test's second agent version
#
# UNIDESK_IMAGE_CREATED sets the created label (an RFC 3339 time; now by
# default) and UNIDESK_IMAGE_SOURCE the source label (the origin remote).
#   --no-cargo                use the binaries already in target/ as they are
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

PROFILE=${UNIDESK_IMAGE_PROFILE:-release}
ONLY="server,agent,gateway,postgres,git"
EXTRA_TAGS=()
CARGO=1
BASE=debian:bookworm-slim
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

say() { printf 'images: %s\n' "$*" >&2; }
die() {
    say "$*"
    exit 1
}

while (($#)); do
    case $1 in
    --profile) PROFILE=${2:?--profile needs release or debug}; shift 2 ;;
    --only) ONLY=${2:?--only needs names}; shift 2 ;;
    --tag) EXTRA_TAGS+=("${2:?--tag needs a tag}"); shift 2 ;;
    --no-cargo) CARGO=0; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown argument $1 (see --help)" ;;
    esac
done
case $PROFILE in
release | debug) ;;
*) die "the profile is release or debug, not $PROFILE" ;;
esac
wanted() { [[ ,$ONLY, == *,$1,* ]]; }

command -v docker >/dev/null 2>&1 || die "docker not found"

VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[[ -n $VERSION ]] || die "no version in [workspace.package] of Cargo.toml"
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
SHORT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null) ]]; then
    SHORT="$SHORT-dirty"
fi
SOURCE=${UNIDESK_IMAGE_SOURCE:-$(git remote get-url origin 2>/dev/null || echo "https://example.invalid/unidesk")}
CREATED=${UNIDESK_IMAGE_CREATED:-$(date -u +%Y-%m-%dT%H:%M:%SZ)}

# 1. The base image.
base_image() {
    if docker image inspect "$BASE" >/dev/null 2>&1; then
        say "$BASE exists"
        return 0
    fi
    command -v debootstrap >/dev/null 2>&1 ||
        die "debootstrap not found: apt-get install debootstrap (or load a $BASE image)"
    ((EUID == 0)) || die "debootstrap needs root to make $BASE"
    local dir
    dir=$(mktemp -d /tmp/unidesk-rootfs.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf -- '$dir'" EXIT
    say "debootstrap --variant=minbase bookworm from $MIRROR (a few minutes)"
    debootstrap --variant=minbase bookworm "$dir" "$MIRROR" >"$dir.log" 2>&1 || {
        tail -n 30 "$dir.log" >&2
        die "debootstrap failed (its log: $dir.log)"
    }
    rm -f -- "$dir.log"
    # What a slim image leaves out: the package lists, caches, docs and
    # manuals, and a sources list pointing at the mirror used.
    # Translations too: every message of every program in every language.
    rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/*.bin "$dir"/var/cache/apt/archives/*.deb \
        "$dir"/usr/share/doc/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/var/log/*.log \
        "$dir"/usr/share/locale/*
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\ndeb http://deb.debian.org/debian-security bookworm-security main\n' \
        "$MIRROR" "$MIRROR" >"$dir/etc/apt/sources.list"
    # Keep later images small: no docs, no recommends.
    printf 'path-exclude /usr/share/doc/*\npath-include /usr/share/doc/*/copyright\npath-exclude /usr/share/man/*\npath-exclude /usr/share/info/*\npath-exclude /usr/share/locale/*\n' \
        >"$dir/etc/dpkg/dpkg.cfg.d/slim"
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' >"$dir/etc/apt/apt.conf.d/slim"
    tar -C "$dir" -c . | docker import \
        --change 'CMD ["bash"]' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        - "$BASE" >/dev/null
    rm -rf -- "$dir"
    trap - EXIT
    say "$BASE imported ($(docker image inspect -f '{{.Size}}' "$BASE" | awk '{printf "%.0f MB", $1/1e6}'))"
}

# 2. The binaries, copied into a build context of their own.
CONTEXT=""
binaries() {
    local dir=target/release bins=() pkgs=() b
    if wanted server; then bins+=(--bin unidesk); pkgs+=(-p unidesk); fi
    if wanted agent; then bins+=(--bin unidesk-agent); pkgs+=(-p node-agent); fi
    CONTEXT=$(mktemp -d /tmp/unidesk-images.XXXXXX)
    # shellcheck disable=SC2064
    trap "rm -rf -- '$CONTEXT'" EXIT
    mkdir -p "$CONTEXT/bin"
    cp -r ops/docker/. "$CONTEXT/"
    chmod 0755 "$CONTEXT"/*.sh
    chmod 0644 "$CONTEXT"/Caddyfile
    ((${#bins[@]})) || return 0
    if [[ $PROFILE == debug ]]; then dir=target/debug; fi
    if ((CARGO)); then
        say "cargo build ($PROFILE) ${bins[*]}"
        if [[ $PROFILE == release ]]; then
            cargo build --release "${pkgs[@]}" "${bins[@]}"
        else
            cargo build "${pkgs[@]}" "${bins[@]}"
        fi
    fi
    for b in unidesk unidesk-agent; do
        [[ " ${bins[*]} " == *" $b "* ]] || continue
        [[ -x $dir/$b ]] || die "$dir/$b not found: build it, or leave out --no-cargo"
        cp -- "$dir/$b" "$CONTEXT/bin/$b"
        # Debug info is most of a debug binary; without it the image is a
        # fraction of the size and a backtrace still names functions.
        strip --strip-debug "$CONTEXT/bin/$b" 2>/dev/null || objcopy --strip-debug "$CONTEXT/bin/$b"
    done
}

# 3. One image: build NAME from ops/docker/NAME.Dockerfile.
build() {
    local name=$1 image="unidesk/$1" tags=() t
    if ((${#EXTRA_TAGS[@]})); then
        for t in "${EXTRA_TAGS[@]}"; do tags+=(-t "$image:$t"); done
    else
        tags=(-t "$image:$VERSION" -t "$image:$VERSION-$SHORT")
    fi
    say "docker build $image (${tags[*]//-t /})"
    docker build -q -f "$CONTEXT/$name.Dockerfile" "${tags[@]}" \
        --build-arg "VERSION=$VERSION" \
        --build-arg "REVISION=$REVISION" \
        --build-arg "SOURCE=$SOURCE" \
        --build-arg "CREATED=$CREATED" \
        --build-arg "PROFILE=$PROFILE" \
        "$CONTEXT" >/dev/null 2> >(grep -v -e 'legacy builder is deprecated' -e 'Install the buildx' -e 'docs.docker.com/go/buildx' -e '^$' >&2)
    t=${tags[1]}
    say "$t: $(docker image inspect -f '{{.Size}}' "$t" | awk '{printf "%.0f MB", $1/1e6}')"
}

base_image
binaries
for name in server agent gateway postgres git; do
    if wanted "$name"; then build "$name"; fi
done
say "done: version $VERSION, revision $SHORT, profile $PROFILE"
