#!/usr/bin/env bash
# The test command of UniDesk, for people and CI alike.
#
# Installs what the build and the tests need when it is missing (on Debian
# and Ubuntu, as root or through sudo), starts one private PostgreSQL
# cluster for the whole run, then checks formatting, runs clippy and runs
# every test. Extra arguments go to `cargo test`; when they select crates
# with -p/--package, formatting and clippy are limited to those crates too.
#
#   bash ops/test.sh                      # everything
#   bash ops/test.sh -p store             # one crate
#   bash ops/test.sh -- --nocapture       # arguments for the test binaries
#
# The full run then puts a real cluster through randomised faults
# (bench/src/bin/faults.rs: kills, partitions, a frozen leader, database
# outages) and audits its event log; UNIDESK_FAULT_ROUNDS (10) and
# UNIDESK_FAULT_SEED (fixed, so a finding can be replayed) change the run.
# It needs Docker, and root for its network namespaces (without root its
# real agents run without them).
#
# The full run then checks the API against its own OpenAPI document:
# schemathesis (a pinned version, in a virtualenv under
# ${XDG_CACHE_HOME:-~/.cache}/unidesk) fuzzes every operation of a fresh
# `unidesk dev` and fails the run on any finding. UNIDESK_SCHEMATHESIS_SEED
# picks its seed (fixed by default, so a finding can be replayed).
#
# Last, the deployment's system test (tests/deploy/run.sh) builds the
# images with debug binaries and puts compose.yml through TLS, a task from a
# git daemon, an agent upgrade during a task, a backup, down/up and a
# restore (about 5 minutes once the images' layers are cached).
# UNIDESK_SKIP_DEPLOY=1 leaves it out, for quicker runs.
#
# To test against a server of your own instead of a private cluster, set
# UNIDESK_TEST_DATABASE_URL to a URL of a user who may CREATE DATABASE,
# such as postgres://me:secret@127.0.0.1:5432/postgres.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Debian packages the build and the tests need. Add to this list when a
# crate needs another system library or tool. The PostgreSQL server is
# handled apart: it is installed only when no initdb is found. The OpenSSH
# server and client are for the host SSH and private repository tests,
# which start their own sshd (openssl makes their private CA);
# Chromium and its WebDriver for the web view's browser test; Python's venv
# for schemathesis, which checks the API against its OpenAPI document;
# debootstrap, docker-compose, jq, curl and openssl for the deployment test;
# Prometheus for promtool, which checks the text every /metrics serves.
APT_PACKAGES=(pkg-config libssl-dev busybox-static git openssh-server openssh-client chromium chromium-driver python3-venv
    debootstrap docker-compose jq curl openssl binutils prometheus)

# The schemathesis release the API is checked with, the seed, and how many
# cases per operation and phase: together about 3 minutes on 2 cores.
SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_SEED=${UNIDESK_SCHEMATHESIS_SEED:-20261204}
SCHEMATHESIS_EXAMPLES=30

# The fault harness's rounds and seed.
FAULT_ROUNDS=${UNIDESK_FAULT_ROUNDS:-10}
FAULT_SEED=${UNIDESK_FAULT_SEED:-20261204}

STEP="setup"
PG_DIR=""
PG_BIN=""
PG_AS=()       # the command prefix that runs a program as the postgres user
APT_UPDATED=0
DEV_DIR=""     # the working directory of the `unidesk dev` schemathesis tests
DEV_PID=""
DEV_URL=""

say() { printf '%s\n' "$*" >&2; }

begin() {
    STEP=$1
    printf '\n==> %s\n' "$STEP" >&2
}

on_exit() {
    local status=$?
    stop_dev
    stop_cluster
    if ((status != 0)); then
        say ""
        say "ops/test.sh: FAILED at step: $STEP (exit status $status)"
    fi
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

die() {
    say "ops/test.sh: $*"
    exit 1
}

# as_root CMD...: runs CMD as root, through sudo when we are not root.
as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null 2>&1; then
        sudo "$@"
    else
        die "this needs root: run as root, or install sudo, to do: $*"
    fi
}

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "missing $*: install it with your system's package manager (this script knows apt-get only)"
    if ((APT_UPDATED == 0)); then
        as_root apt-get update
        APT_UPDATED=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# The directory of initdb, pg_ctl and postgres: initdb on PATH, else the
# newest /usr/lib/postgresql/*/bin (where Debian keeps them, off PATH).
find_pg_bin() {
    local initdb dir
    if initdb=$(command -v initdb 2>/dev/null); then
        dirname "$(readlink -f "$initdb")"
        return 0
    fi
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n $dir && -x $dir/initdb ]]; then
        printf '%s\n' "$dir"
        return 0
    fi
    return 1
}

check_toolchain() {
    command -v cargo >/dev/null 2>&1 ||
        die "cargo not found: install Rust with rustup (https://rustup.rs) and open a new shell"
    cargo fmt --version >/dev/null 2>&1 ||
        die "rustfmt not found: rustup component add rustfmt"
    cargo clippy --version >/dev/null 2>&1 ||
        die "clippy not found: rustup component add clippy"
}

install_packages() {
    local missing=() pkg
    if command -v dpkg-query >/dev/null 2>&1; then
        for pkg in "${APT_PACKAGES[@]}"; do
            if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed'; then
                missing+=("$pkg")
            fi
        done
    fi
    if ! find_pg_bin >/dev/null; then
        missing+=(postgresql)
    fi
    if ((${#missing[@]} == 0)); then
        say "nothing to install"
        return 0
    fi
    say "installing: ${missing[*]}"
    apt_install "${missing[@]}"
}

# A TCP port on 127.0.0.1 that nothing listens on (pg_ctl is retried when
# another process takes it first).
free_port() {
    local port _
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            printf '%s\n' "$port"
            return 0
        fi
    done
    return 1
}

# run_pg PROGRAM ARGS...: runs a PostgreSQL program from $PG_BIN, as the
# postgres user when we are root (PostgreSQL refuses to run as root), from /
# so that the working directory is always readable.
run_pg() {
    local program=$1
    shift
    (cd / && "${PG_AS[@]}" "$PG_BIN/$program" "$@")
}

start_cluster() {
    if [[ -n ${UNIDESK_TEST_DATABASE_URL:-} ]]; then
        say "using the server in UNIDESK_TEST_DATABASE_URL"
        return 0
    fi
    PG_BIN=$(find_pg_bin) ||
        die "initdb not found: install the PostgreSQL server (Debian/Ubuntu: apt-get install postgresql)"
    # Under /tmp: short enough for a unix socket path, and open to postgres.
    PG_DIR=$(mktemp -d /tmp/unidesk-test-pg.XXXXXX)
    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 ||
            die "no postgres user: PostgreSQL refuses to run as root; install the PostgreSQL server or run as an ordinary user"
        command -v runuser >/dev/null 2>&1 || die "runuser not found: apt-get install util-linux"
        chown postgres: "$PG_DIR"
        PG_AS=(runuser -u postgres --)
    fi
    local password port attempt
    password=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077 && printf '%s\n' "$password" >"$PG_DIR/password")
    if ((EUID == 0)); then chown postgres: "$PG_DIR/password"; fi

    if ! run_pg initdb -D "$PG_DIR/data" -U unidesk --auth=scram-sha-256 \
        --pwfile="$PG_DIR/password" -E UTF8 --locale=C --no-sync >"$PG_DIR/initdb.log" 2>&1; then
        cat "$PG_DIR/initdb.log" >&2
        return 1
    fi
    for attempt in 1 2 3 4 5; do
        port=$(free_port) || die "no free TCP port found on 127.0.0.1"
        if run_pg pg_ctl start -w -D "$PG_DIR/data" -l "$PG_DIR/server.log" \
            -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$PG_DIR -c max_connections=300 -c fsync=off -c synchronous_commit=off -c full_page_writes=off" \
            >/dev/null; then
            export UNIDESK_TEST_DATABASE_URL="postgres://unidesk:$password@127.0.0.1:$port/postgres"
            say "PostgreSQL $(basename "$(dirname "$PG_BIN")") on 127.0.0.1:$port, data in $PG_DIR"
            return 0
        fi
        grep -qE 'could not bind|could not create any TCP/IP sockets' "$PG_DIR/server.log" || break
        say "port $port was taken, trying another (attempt $attempt)"
    done
    say "PostgreSQL did not start; the end of $PG_DIR/server.log:"
    tail -n 30 "$PG_DIR/server.log" >&2 || true
    return 1
}

stop_cluster() {
    if [[ -n $PG_DIR && -d $PG_DIR ]]; then
        if [[ -n $PG_BIN && -f $PG_DIR/data/postmaster.pid ]]; then
            run_pg pg_ctl stop -D "$PG_DIR/data" -m immediate -w >/dev/null 2>&1 || true
        fi
        rm -rf -- "$PG_DIR"
    fi
    PG_DIR=""
}

# A virtualenv with schemathesis $SCHEMATHESIS_VERSION; prints its path.
# Made once per version under the user's cache directory.
schemathesis_venv() {
    local venv="${XDG_CACHE_HOME:-$HOME/.cache}/unidesk/schemathesis-$SCHEMATHESIS_VERSION"
    if [[ ! -x $venv/bin/st ]]; then
        command -v python3 >/dev/null 2>&1 || die "python3 not found: apt-get install python3-venv"
        rm -rf -- "$venv"
        mkdir -p "$(dirname "$venv")"
        python3 -m venv "$venv" >&2 ||
            die "python3 -m venv failed: apt-get install python3-venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check \
            "schemathesis==$SCHEMATHESIS_VERSION" >&2 || {
            rm -rf -- "$venv"
            die "installing schemathesis $SCHEMATHESIS_VERSION from PyPI failed"
        }
    fi
    printf '%s\n' "$venv"
}

# Starts `unidesk dev --no-agent` in a fresh directory on a free port;
# sets DEV_URL once it is running and its admin token exists.
start_dev() {
    local port _ program
    program="$PWD/target/debug/unidesk"
    DEV_DIR=$(mktemp -d /tmp/unidesk-schemathesis.XXXXXX)
    # dev runs PostgreSQL as the postgres user when we are root: it must
    # pass through this directory to reach its own.
    chmod 711 "$DEV_DIR"
    port=$(free_port) || die "no free TCP port found on 127.0.0.1"
    (cd "$DEV_DIR" && exec "$program" dev --no-agent \
        --listen "127.0.0.1:$port" >"$DEV_DIR/dev.log" 2>&1) &
    DEV_PID=$!
    for _ in $(seq 1 120); do
        if [[ -s $DEV_DIR/.unidesk/admin.token ]] && grep -q 'UniDesk is running' "$DEV_DIR/dev.log"; then
            DEV_URL="http://127.0.0.1:$port"
            return 0
        fi
        kill -0 "$DEV_PID" 2>/dev/null || break
        sleep 1
    done
    say "unidesk dev did not start; its log:"
    cat "$DEV_DIR/dev.log" >&2 || true
    return 1
}

# Stops the dev server with Ctrl-C, as a person would (it stops its
# PostgreSQL then), and removes its directory.
stop_dev() {
    local _
    if [[ -n $DEV_PID ]]; then
        kill -INT "$DEV_PID" 2>/dev/null || true
        for _ in $(seq 1 60); do
            kill -0 "$DEV_PID" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$DEV_PID" 2>/dev/null; then
            say "unidesk dev did not stop; killing it"
            kill -KILL "$DEV_PID" 2>/dev/null || true
        fi
        wait "$DEV_PID" 2>/dev/null || true
        DEV_PID=""
    fi
    if [[ -n $DEV_DIR && -d $DEV_DIR ]]; then
        rm -rf -- "$DEV_DIR"
    fi
    DEV_DIR=""
}

# Fuzzes the API of a fresh dev server against its OpenAPI document with
# every schemathesis check (among them negative_data_rejection and
# response_schema_conformance); any finding fails the run. One worker:
# hypothesis is not safe with threads on every Python.
check_api_document() {
    local venv base token config
    config="$PWD/ops/schemathesis.toml"
    venv=$(schemathesis_venv)
    cargo build -p unidesk
    start_dev
    base=$DEV_URL
    token=$(cat "$DEV_DIR/.unidesk/admin.token")
    say "schemathesis $SCHEMATHESIS_VERSION against $base, seed $SCHEMATHESIS_SEED"
    (cd "$DEV_DIR" && "$venv/bin/st" --config-file "$config" run "$base/api/v1/openapi.json" \
        --header "Authorization: Bearer $token" \
        --seed "$SCHEMATHESIS_SEED" \
        --max-examples "$SCHEMATHESIS_EXAMPLES" \
        --workers 1 \
        --wait-for-schema 30)
    stop_dev
}

# Runs the fault harness for FAULT_ROUNDS rounds: a real cluster (split
# roles, a scheduler leader and standby, real agents running Docker tasks,
# simulated agents) through kills, partitions, a frozen leader and database
# outages, then an audit of its log. Any violation fails the run; the
# harness prints how to replay it and keeps every process's log.
run_fault_harness() {
    local netns=()
    cargo build -p unidesk -p node-agent -p bench --bin unidesk --bin unidesk-agent --bin unidesk-faults
    if ((EUID != 0)); then
        say "not root: the fault harness's real agents run without network namespaces"
        netns=(--netns-agents 0)
    fi
    "$PWD/target/debug/unidesk-faults" --rounds "$FAULT_ROUNDS" --seed "$FAULT_SEED" "${netns[@]}"
}

# The -p/--package arguments among the ones for cargo test.
PACKAGES=()
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
    case ${args[i]} in
    --) break ;;
    -p | --package)
        PACKAGES+=("${args[i]}" "${args[i + 1]:-}")
        i=$((i + 1))
        ;;
    -p?* | --package=*) PACKAGES+=("${args[i]}") ;;
    esac
done

begin "checking the Rust toolchain"
check_toolchain

begin "installing missing system packages"
install_packages

begin "starting a private PostgreSQL cluster"
start_cluster

if ((${#PACKAGES[@]})); then
    begin "cargo fmt ${PACKAGES[*]} -- --check"
    cargo fmt "${PACKAGES[@]}" -- --check

    begin "cargo clippy ${PACKAGES[*]} --all-targets -- -D warnings"
    cargo clippy "${PACKAGES[@]}" --all-targets -- -D warnings

    begin "cargo test $*"
    cargo test "$@"
else
    begin "cargo fmt --all -- --check"
    cargo fmt --all -- --check

    begin "cargo clippy --workspace --all-targets -- -D warnings"
    cargo clippy --workspace --all-targets -- -D warnings

    begin "cargo test --workspace $*"
    cargo test --workspace "$@"

    begin "fault harness: $FAULT_ROUNDS rounds, seed $FAULT_SEED"
    run_fault_harness

    begin "schemathesis: the API against its OpenAPI document"
    check_api_document

    begin "deployment: compose.yml end to end (tests/deploy/run.sh)"
    if [[ ${UNIDESK_SKIP_DEPLOY:-0} == 1 ]]; then
        say "skipped (UNIDESK_SKIP_DEPLOY=1)"
    else
        bash tests/deploy/run.sh
    fi
fi

STEP="done"
say ""
say "ops/test.sh: all steps passed"
