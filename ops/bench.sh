#!/usr/bin/env bash
# UniDesk's benchmarks and the references to quote them against, in one run.
#
# These machines are shared and noisy: absolute figures drift 2-4x between
# runs, ratios taken within one run hold (bench/reference/README.md). So this
# script measures the references and UniDesk one after the other, on the same
# machine, and prints every figure, then all of them again as a summary:
#
#   1. cargo build --release -p unidesk -p node-agent -p bench (the server,
#      the agent and the benchmark binaries of bench/, side by side in
#      target/release)
#   2. references, on a throw-away PostgreSQL with the same settings as the
#      clusters the benchmarks start themselves (no fsync):
#      - bench/reference/ceiling.sh: what PostgreSQL alone can do for our work;
#      - bench/reference/peer-procrastinate.sh: a peer task queue (procrastinate,
#        installed from PyPI into a virtualenv under $TMPDIR);
#   3. unidesk-bench: commands per second through the event-sourced core;
#   4. unidesk-loadgen lifecycle, latency and idle: the whole server (every
#      role in one `unidesk serve`) driven over REST and by simulated agents
#      on real WebSockets, each on a private PostgreSQL of its own;
#   5. unidesk-exec-bench: execution on a node, through a real `unidesk dev`
#      and Docker: assigned -> running with the node's caches cold and warm,
#      and what the git cache fetches for a new commit against a clone
#      (needs Docker, `git daemon` and /bin/busybox);
#   6. unidesk-replay-bench: `projections rebuild` over a log of a million
#      events, next to a plain SELECT scan of the same rows, on a private
#      PostgreSQL of its own;
#   6a. unidesk-s3-bench: a large file up and down through presigned URLs
#      to the embedded object store, with plain `curl` (a multipart upload
#      of the same parts, a download) and with the agent's transfer code,
#      in the same run; the ratio agent/curl each way;
#   6b. unidesk-loadgen event-view: GET /events/{position} on a node
#      whose history holds 100,000 events (state before and after, from the
#      nearest snapshot);
#   7. unidesk-loadgen shutdown: SIGTERM to an ingress holding 10,000
#      agents, reports in flight: time to exit, close frames, nothing
#      acknowledged lost;
#   8. unidesk-faults: a long fault run (100 rounds of kills, partitions,
#      a frozen leader and database outages on a real cluster with real
#      and simulated agents), then an audit of the log; needs Docker and
#      root (network namespaces).
#
#   bash ops/bench.sh
#
# Settings, from the environment (defaults in brackets):
#   REFERENCE [bench/reference] where ceiling.sh and friends live
#   BENCH_SECONDS [10]          seconds per unidesk-bench figure
#   LIFECYCLE_AGENTS [100]  LIFECYCLE_TASKS [5000]
#   LATENCY_RATE [20]  LATENCY_SECONDS [30]  LATENCY_AGENTS [10]
#   LATENCY_WARMUP_S [3]        seconds of submissions at the same rate before
#                               the measured ones, left out of the figures, for
#                               procrastinate and UniDesk alike
#   IDLE_AGENTS [10000]  IDLE_PROCS [5]
#   SKIP_PEER [0]               1 skips procrastinate (no PyPI access)
#   EXEC_RUNS [5]  EXEC_FETCH_RUNS [5]
#   SKIP_EXEC [0]               1 skips unidesk-exec-bench (no Docker)
#   REPLAY_EVENTS [1000000]     events in the log unidesk-replay-bench rebuilds
#   SKIP_REPLAY [0]             1 skips unidesk-replay-bench
#   S3_MIB [1024]  S3_PART_MIB [64]  size of unidesk-s3-bench's file, of its parts
#   S3_ROUNDS [5]               rounds of unidesk-s3-bench (each figure their median)
#   SKIP_S3 [0]                 1 skips unidesk-s3-bench (no curl)
#   EVENT_VIEW_EVENTS [100000]  events of the node event-view reads
#   SHUTDOWN_AGENTS [10000]  SHUTDOWN_PROCS [5]  SHUTDOWN_TASKS [1000]
#   FAULT_ROUNDS [100]  FAULT_SEED [random, printed]
#   SKIP_FAULTS [0]             1 skips unidesk-faults
#
# Run it as root or as an ordinary user; as root, PostgreSQL runs as the
# `postgres` user (it refuses to run as root). Server logs of the loadgen
# runs are kept in the work directory printed at the start.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

BENCH_DIR=${REFERENCE:-bench/reference}
BENCH_SECONDS=${BENCH_SECONDS:-10}
LIFECYCLE_AGENTS=${LIFECYCLE_AGENTS:-100}
LIFECYCLE_TASKS=${LIFECYCLE_TASKS:-5000}
LATENCY_RATE=${LATENCY_RATE:-20}
LATENCY_SECONDS=${LATENCY_SECONDS:-30}
LATENCY_AGENTS=${LATENCY_AGENTS:-10}
LATENCY_WARMUP_S=${LATENCY_WARMUP_S:-3}
IDLE_AGENTS=${IDLE_AGENTS:-10000}
IDLE_PROCS=${IDLE_PROCS:-5}
SKIP_PEER=${SKIP_PEER:-0}
EXEC_RUNS=${EXEC_RUNS:-5}
EXEC_FETCH_RUNS=${EXEC_FETCH_RUNS:-5}
SKIP_EXEC=${SKIP_EXEC:-0}
REPLAY_EVENTS=${REPLAY_EVENTS:-1000000}
SKIP_REPLAY=${SKIP_REPLAY:-0}
S3_MIB=${S3_MIB:-1024}
S3_PART_MIB=${S3_PART_MIB:-64}
S3_ROUNDS=${S3_ROUNDS:-5}
SKIP_S3=${SKIP_S3:-0}
EVENT_VIEW_EVENTS=${EVENT_VIEW_EVENTS:-100000}
SHUTDOWN_AGENTS=${SHUTDOWN_AGENTS:-10000}
SHUTDOWN_PROCS=${SHUTDOWN_PROCS:-5}
SHUTDOWN_TASKS=${SHUTDOWN_TASKS:-1000}
FAULT_ROUNDS=${FAULT_ROUNDS:-100}
FAULT_SEED=${FAULT_SEED:-}
SKIP_FAULTS=${SKIP_FAULTS:-0}

STEP="setup"
PG_PID=""
STEPS=()

say() { printf '%s\n' "$*" >&2; }

die() {
    say "ops/bench.sh: $*"
    exit 1
}

begin() {
    STEP=$1
    printf '\n==> %s\n' "$STEP" >&2
}

stop_reference_db() {
    if [[ -n $PG_PID ]]; then
        kill -TERM "$PG_PID" 2>/dev/null || true
        wait "$PG_PID" 2>/dev/null || true
        PG_PID=""
    fi
}

on_exit() {
    local status=$?
    stop_reference_db
    if ((status != 0)); then
        say ""
        say "ops/bench.sh: FAILED at step: $STEP (exit status $status)"
    fi
    exit "$status"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

check_tools() {
    command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup (https://rustup.rs)"
    [[ -f $BENCH_DIR/ceiling.sh ]] || die "$BENCH_DIR/ceiling.sh not found: set REFERENCE to the folder of the reference scripts"
    command -v psql >/dev/null 2>&1 || die "psql not found (Debian/Ubuntu: apt-get install postgresql-client)"
    command -v pgbench >/dev/null 2>&1 || ls /usr/lib/postgresql/*/bin/pgbench >/dev/null 2>&1 ||
        die "pgbench not found (Debian/Ubuntu: apt-get install postgresql-contrib)"
    if ((SKIP_PEER == 0)); then
        python3 -c 'import venv' 2>/dev/null ||
            die "python3 with venv not found (Debian/Ubuntu: apt-get install python3-venv), or set SKIP_PEER=1"
    fi
    if ((SKIP_EXEC == 0)); then
        [[ -x /bin/busybox ]] ||
            die "/bin/busybox not found: unidesk-exec-bench builds its images from it (Debian/Ubuntu: apt-get install busybox-static), or set SKIP_EXEC=1"
        command -v docker >/dev/null 2>&1 || die "docker not found: unidesk-exec-bench needs it, or set SKIP_EXEC=1"
    fi
    if ((EUID == 0)); then
        id postgres >/dev/null 2>&1 ||
            die "no postgres user: PostgreSQL refuses to run as root and runs as postgres; install the PostgreSQL server"
    fi
}

# run NAME CMD...: runs a measurement, showing its output and keeping a copy
# for the summary.
run() {
    local name=$1
    shift
    STEPS+=("$name")
    "$@" 2>&1 | tee "$WORK/$name.out"
}

# A throw-away PostgreSQL for the reference scripts, run by the loadgen so it
# is made exactly like the benchmarks' own clusters; it stops when the
# loadgen gets SIGTERM or dies.
start_reference_db() {
    "$BIN/unidesk-loadgen" postgres --scratch peer >"$WORK/pg.env" 2>"$WORK/pg.log" &
    PG_PID=$!
    local _
    for _ in $(seq 1 600); do
        grep -qx READY "$WORK/pg.env" && break
        kill -0 "$PG_PID" 2>/dev/null || { cat "$WORK/pg.log" >&2; die "the reference PostgreSQL did not start"; }
        sleep 0.2
    done
    grep -qx READY "$WORK/pg.env" || die "the reference PostgreSQL did not start within 120 s"
    DB_URL=$(sed -n 's/^DATABASE_URL=//p' "$WORK/pg.env")
    PEER_URL=$(sed -n 's/^SCRATCH_URL=//p' "$WORK/pg.env")
    rm -f "$WORK/pg.env"
}

summary() {
    local name pattern
    printf '\n==> summary (%s, %s cores)\n' "$(date -u +%Y-%m-%dT%H:%MZ)" "$(nproc)"
    for name in "${STEPS[@]}"; do
        case $name in
        ceiling) pattern='^ceiling' ;;
        procrastinate) pattern='^(enqueue jobs/s|e2e burn-down|latency:)' ;;
        core) pattern='^(plain single-row|cqrs command)' ;;
        *) pattern="^($name:|provisioned|server( log)?:|[0-9]+ agents connected)" ;;
        esac
        grep -E "$pattern" "$WORK/$name.out" | sed "s/^/[$name] /" || true
    done
    printf '\nlogs and outputs: %s\n' "$WORK"
}

begin "checking tools"
check_tools
WORK=$(mktemp -d "${TMPDIR:-/tmp}/unidesk-bench.XXXXXX")
say "work directory: $WORK"

begin "cargo build --release -p unidesk -p node-agent -p bench"
cargo build --release -p unidesk -p node-agent -p bench
BIN=${CARGO_TARGET_DIR:-$PWD/target}/release
[[ -x $BIN/unidesk-loadgen ]] || die "$BIN/unidesk-loadgen was not built"

begin "starting a throw-away PostgreSQL for the references"
start_reference_db

begin "reference: ceiling.sh"
run ceiling bash "$BENCH_DIR/ceiling.sh" "$DB_URL"

if ((SKIP_PEER == 0)); then
    begin "reference: peer-procrastinate.sh"
    run procrastinate env LAT_RATE="$LATENCY_RATE" LAT_WARMUP_S="$LATENCY_WARMUP_S" \
        bash "$BENCH_DIR/peer-procrastinate.sh" "$PEER_URL"
fi
stop_reference_db

begin "unidesk-bench: the event-sourced core"
run core "$BIN/unidesk-bench" --seconds "$BENCH_SECONDS" --writers 1,16

begin "unidesk-loadgen lifecycle"
run lifecycle "$BIN/unidesk-loadgen" lifecycle --agents "$LIFECYCLE_AGENTS" \
    --tasks "$LIFECYCLE_TASKS" --server-log "$WORK/lifecycle-server.log"

begin "unidesk-loadgen latency"
run latency "$BIN/unidesk-loadgen" latency --rate "$LATENCY_RATE" \
    --seconds "$LATENCY_SECONDS" --agents "$LATENCY_AGENTS" --warmup-s "$LATENCY_WARMUP_S" \
    --server-log "$WORK/latency-server.log"

begin "unidesk-loadgen idle"
run idle "$BIN/unidesk-loadgen" idle --agents "$IDLE_AGENTS" --procs "$IDLE_PROCS" \
    --server-log "$WORK/idle-server.log"

# --- execution on a node -----------------------------------------------------
# `unidesk dev` with its local node and Docker, and repositories served by
# `git daemon`; its `exec:` lines join the summary.
if ((SKIP_EXEC == 0)); then
    begin "unidesk-exec-bench: cached vs cold start, incremental fetch"
    command -v docker >/dev/null 2>&1 || die "docker not found: unidesk-exec-bench runs tasks in Docker (or set SKIP_EXEC=1)"
    run exec "$BIN/unidesk-exec-bench" --runs "$EXEC_RUNS" --fetch-runs "$EXEC_FETCH_RUNS"
fi
# -----------------------------------------------------------------------------

# --- rebuilding read models from the log -------------------------------------
# Seeds a private PostgreSQL with REPLAY_EVENTS events, scans them with a
# plain SELECT, then rebuilds every read model from them (twice: into empty
# models, then over full ones); its `replay:` lines join the summary.
if ((SKIP_REPLAY == 0)); then
    begin "unidesk-replay-bench: projections rebuild vs a plain SELECT scan"
    run replay "$BIN/unidesk-replay-bench" --events "$REPLAY_EVENTS"
fi
# -----------------------------------------------------------------------------

# --- large files through the object store -------------------------------------
# The same file up and down with curl and with the agent's transfer code,
# against the embedded store, in the work directory; its `s3:` lines join
# the summary.
if ((SKIP_S3 == 0)); then
    begin "unidesk-s3-bench: $S3_MIB MiB with curl and with the agent's code"
    command -v curl >/dev/null 2>&1 || die "curl not found: unidesk-s3-bench measures against it (or set SKIP_S3=1)"
    run s3 "$BIN/unidesk-s3-bench" --mib "$S3_MIB" --part-mib "$S3_PART_MIB" --rounds "$S3_ROUNDS" --dir "$WORK"
fi
# -----------------------------------------------------------------------------

begin "unidesk-loadgen event-view"
run event-view "$BIN/unidesk-loadgen" event-view --events "$EVENT_VIEW_EVENTS" \
    --server-log "$WORK/event-view-server.log"

begin "unidesk-loadgen shutdown"
run shutdown "$BIN/unidesk-loadgen" shutdown --agents "$SHUTDOWN_AGENTS" --procs "$SHUTDOWN_PROCS" \
    --tasks "$SHUTDOWN_TASKS" --log-dir "$WORK/shutdown-logs"

# --- faults ------------------------------------------------------------------
# A real cluster through FAULT_ROUNDS randomised faults, then an audit of its
# log; every violation is printed with how to replay it. Its `faults:` lines
# join the summary.
if ((SKIP_FAULTS == 0)); then
    begin "unidesk-faults: $FAULT_ROUNDS rounds"
    command -v docker >/dev/null 2>&1 || die "docker not found: unidesk-faults runs real agents (or set SKIP_FAULTS=1)"
    seed=()
    [[ -n $FAULT_SEED ]] && seed=(--seed "$FAULT_SEED")
    run faults "$BIN/unidesk-faults" --rounds "$FAULT_ROUNDS" "${seed[@]}" --work-dir "$WORK/faults" ||
        say "unidesk-faults found violations or failed: see above; its logs are in $WORK/faults"
fi
# -----------------------------------------------------------------------------

STEP="done"
summary
