#!/usr/bin/env bash
# Restores a dump made by the backup service (pg_dump's custom format) into
# a fresh PostgreSQL volume, then checks that this build can apply every
# restored event (`unidesk replay --check`) and prints the event log's
# count and final hash (`unidesk events export`), to compare with the
# source's.
#
#   bash ops/restore.sh [--volume NAME] DUMP
#
#   --volume NAME   the volume to create (it must not exist); by default
#                   unidesk-restore-<UTC time>. To put a deployment on it:
#                   `docker-compose down`, `docker volume rm
#                   <project>_postgres-data`, restore with --volume
#                   <project>_postgres-data, `docker-compose up -d`.
#
# Uses the images unidesk/postgres and unidesk/server of UNIDESK_VERSION
# (the workspace's version by default). The database runs on a network of
# its own that has no route out, and is stopped at the end; the volume
# stays. Exits non-zero when the restore or the check fails (the volume is
# then removed).
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

VOLUME=""
while (($#)); do
    case $1 in
    --volume) VOLUME=${2:?--volume needs a name}; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "restore: unknown option $1" >&2; exit 2 ;;
    *) break ;;
    esac
done
DUMP=${1:?usage: ops/restore.sh [--volume NAME] DUMP}
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
deadline=$((SECONDS + 120))
until docker exec "$DB" pg_isready -q -U unidesk -d unidesk 2>/dev/null; do
    if ((SECONDS > deadline)) || [[ $(docker inspect -f '{{.State.Running}}' "$DB") != true ]]; then
        docker logs "$DB" >&2 || true
        say "PostgreSQL did not start"
        exit 1
    fi
    sleep 0.5
done

start=$SECONDS
say "pg_restore of $DUMP ($(stat -c %s "$DUMP") bytes)"
docker exec -i "$DB" pg_restore --exit-on-error --no-owner --role=unidesk -U unidesk -d unidesk <"$DUMP"
say "restored in $((SECONDS - start)) s"

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
server events export 2>&1 >/dev/null | grep -E '^exported ' || {
    say "the event export failed"
    exit 1
}
OK=1
say "done: the restored database is in the volume $VOLUME"
