#!/bin/sh
# The entry point of unidesk/postgres. With `postgres` as the command and an
# empty data directory it first creates the cluster: the superuser
# POSTGRES_USER (unidesk) with the password in POSTGRES_PASSWORD_FILE,
# scram-sha-256 for every network connection, and the database POSTGRES_DB
# (unidesk). Any other command (pg_dump, unidesk-backup, psql) runs as is.
set -eu

if [ "${1:-}" != postgres ]; then
    exec "$@"
fi
shift

user=${POSTGRES_USER:-unidesk}
db=${POSTGRES_DB:-unidesk}
if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=${POSTGRES_PASSWORD_FILE:?set POSTGRES_PASSWORD_FILE to a file holding the password}
    [ -r "$pwfile" ] || { echo "postgres: cannot read $pwfile" >&2; exit 1; }
    echo "postgres: creating the cluster in $PGDATA (user $user, database $db)" >&2
    initdb -D "$PGDATA" -U "$user" --pwfile="$pwfile" -E UTF8 --locale=C.UTF-8 \
        --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    # Inside the container only processes of the container reach the
    # socket; every network client needs the password.
    echo "host all all all scram-sha-256" >>"$PGDATA/pg_hba.conf"
    echo "CREATE DATABASE \"$db\" OWNER \"$user\";" |
        postgres --single -D "$PGDATA" -j postgres >/dev/null
fi

exec postgres -D "$PGDATA" -c listen_addresses='*' -c jit=off \
    -c "max_connections=${POSTGRES_MAX_CONNECTIONS:-200}" \
    -c "shared_buffers=${POSTGRES_SHARED_BUFFERS:-256MB}" "$@"
