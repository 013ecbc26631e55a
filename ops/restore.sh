#!/usr/bin/env bash
# Restores a dump made by the backup service (pg_dump's custom format) into
# a fresh PostgreSQL volume, then checks that this build can apply every
# restored event (`unidesk replay --check`) and prints the event log's
# count and final hash (`unidesk events export`), to compare with the
# source's.
#
#   bash ops/restore.sh [--volume NAME] [--export FILE] DUMP
#
#   --volume NAME   the volume to create (it must not exist); by default
#                   unidesk-restore-<UTC time>. To put a deployment on it:
#                   `docker-compose down`, `docker volume rm
#                   <project>_postgres-data`, restore with --volume
#                   <project>_postgres-data, `docker-compose up -d`.
#   --export FILE   also write the restored event log there (`unidesk
#                   events export`). An export's header holds the time it
#                   was made, which its hash chain covers: compare two
#                   exports by their event lines, not by their final hashes.
#
# Uses the images unidesk/postgres and unidesk/server of UNIDESK_VERSION
# (the workspace's version by default). The database runs on a network of
# its own that has no route out, and is stopped at the end; the volume
# stays. Exits non-zero when the restore or the check fails (the volume is
# then removed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VOLUME=""
EXPORT=""
while (($#)); do
    case $1 in
    --volume) VOLUME=${2:?--volume needs a name}; shift 2 ;;
    --export) EXPORT=${2:?--export needs a file}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "restore: unknown option $1" >&2; exit 2 ;;
    *) break ;;
    esac
done
DUMP=${1:?usage: ops/restore.sh [--volume NAME] [--export FILE] DUMP}
[[ -r $DUMP ]] || { echo "restore: cannot read $DUMP" >&2; exit 2; }

VERSION=${UNIDESK_VERSION:-$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)}
VOLUME=${VOLUME:-unidesk-restore-$(date -u +%Y%m%dT%H%M%SZ)}
ID=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
NETWORK=unidesk-restore-$ID
DB=unidesk-restore-db-$ID
WORK=$(mktemp -d /tmp/unidesk-restore.XXXXXX)
OK=0

say() { printf 'restore: %s\n' "$*" >&2; }

cleanup() {
    docker rm -f "$DB" >/dev/null 2>&1 || true
    docker network rm "$NETWORK" >/dev/null 2>&1 || true
    if ((OK == 0)); then
        docker volume rm "$VOLUME" >/dev/null 2>&1 || true
    fi
    rm -rf -- "$WORK"
}
trap cleanup EXIT

psql_db() { docker exec -i "$DB" psql -X -q -v ON_ERROR_STOP=1 -U unidesk -At "$@"; }
wait_ready() {
    local deadline=$((SECONDS + 120))
    until docker exec "$DB" pg_isready -q -U unidesk -d unidesk 2>/dev/null; do
        if ((SECONDS > deadline)) || [[ $(docker inspect -f '{{.State.Running}}' "$DB") != true ]]; then
            docker logs "$DB" >&2 || true
            say "PostgreSQL did not start"
            exit 1
        fi
        sleep 0.5
    done
}

if docker volume inspect "$VOLUME" >/dev/null 2>&1; then
    say "the volume $VOLUME exists already: restore into a new one"
    OK=1 # not ours: never remove it
    exit 1
fi

# A password for this database only, in a file the containers read.
chmod 0711 "$WORK"
(umask 022 && openssl rand -hex 24 >"$WORK/db_password")

docker volume create "$VOLUME" >/dev/null
docker network create --internal "$NETWORK" >/dev/null
docker run -d --name "$DB" --network "$NETWORK" \
    -v "$VOLUME:/var/lib/postgresql/data" \
    -v "$WORK/db_password:/run/secrets/db_password:ro" \
    -e POSTGRES_PASSWORD_FILE=/run/secrets/db_password \
    "unidesk/postgres:$VERSION" >/dev/null

say "waiting for PostgreSQL in $VOLUME"
wait_ready

start=$SECONDS
say "pg_restore of $DUMP ($(stat -c %s "$DUMP") bytes)"
docker exec -i "$DB" pg_restore --exit-on-error --no-owner --role=unidesk -U unidesk -d unidesk <"$DUMP"
say "restored in $((SECONDS - start)) s"

# A fresh cluster counts transactions from the start, but the restored
# events keep the transaction ids (xid8) of the source: events whose txid
# is not below every running transaction are invisible to outbox readers
# and exports, and new events would sort before old ones. So the cluster's
# next transaction id is moved past the largest restored one, as pg_upgrade
# does: freeze every row, stop, pg_resetwal -e/-x/-u, start, and mark every
# table and database frozen up to the new id.
max_txid=$(psql_db -d unidesk -c "SELECT COALESCE(max(txid)::text, '0') FROM outbox")
next_txid=$(psql_db -d unidesk -c "SELECT pg_current_xact_id()::text")
if ((max_txid >= next_txid)); then
    # The first id of a pg_xact segment (2^20 ids): PostgreSQL makes the
    # segment itself when it reaches it.
    target=$(((max_txid / 1048576 + 1) * 1048576))
    epoch=$((target >> 32))
    xid=$((target & 0xffffffff))
    if ((xid < 3)); then xid=1048576; fi
    say "moving the next transaction id from $next_txid past the restored $max_txid (epoch $epoch, xid $xid)"
    docker exec "$DB" vacuumdb -q -U unidesk --all --freeze
    docker stop -t 60 "$DB" >/dev/null
    docker run --rm -v "$VOLUME:/var/lib/postgresql/data" "unidesk/postgres:$VERSION" \
        pg_resetwal -e "$epoch" -x "$xid" -u "$xid" -D /var/lib/postgresql/data >/dev/null
    docker start "$DB" >/dev/null
    wait_ready
    psql_db -d postgres -c "UPDATE pg_database SET datallowconn = true WHERE datname = 'template0'"
    for db in template0 template1 postgres unidesk; do
        psql_db -d "$db" -c "UPDATE pg_class SET relfrozenxid = '$xid'::xid WHERE NOT relfrozenxid = '0'::xid"
    done
    psql_db -d postgres -c "UPDATE pg_database SET datfrozenxid = '$xid'::xid" \
        -c "UPDATE pg_database SET datallowconn = false WHERE datname = 'template0'"
    next_txid=$(psql_db -d unidesk -c "SELECT pg_current_xact_id()::text")
    ((next_txid > max_txid)) || { say "the next transaction id $next_txid is still not past $max_txid"; exit 1; }
fi

server() {
    docker run --rm --network "$NETWORK" \
        -v "$WORK/db_password:/run/secrets/db_password:ro" \
        -e UNIDESK_DB_PASSWORD_FILE=/run/secrets/db_password \
        -e UNIDESK_DB_HOST="$DB" \
        "unidesk/server:$VERSION" "$@"
}

say "unidesk replay --check"
server replay --check
say "unidesk events export"
server events export 2>"$WORK/export.err" >"$WORK/events.jsonl" || {
    cat "$WORK/export.err" >&2
    say "the event export failed"
    exit 1
}
grep -E '^exported ' "$WORK/export.err" >&2
if [[ -n $EXPORT ]]; then
    cp -- "$WORK/events.jsonl" "$EXPORT"
fi
OK=1
say "done: the restored database is in the volume $VOLUME"
