#!/bin/sh
# The entry point of UniDesk's images: turns secrets kept in files into the
# environment variables the programs read, then runs the command.
#
# For each VAR below, when VAR_FILE names a file, VAR becomes that file's
# content (without its trailing newline). DATABASE_URL, when unset, is made
# from UNIDESK_DB_PASSWORD_FILE and UNIDESK_DB_USER, UNIDESK_DB_HOST,
# UNIDESK_DB_PORT, UNIDESK_DB_NAME (the password must be URL-safe, such as
# the hex of `openssl rand -hex 24`). So compose secrets, Docker secrets
# and mounted files work without a secret ever appearing in a compose file
# or in `docker inspect`.
#
# Variables of UniDesk set to the empty string are removed first: a compose
# file cannot leave a variable out, and an empty value means "not set".
set -eu

for var in $(env | sed -n 's/^\(UNIDESK_[A-Za-z0-9_]*\)=$/\1/p;s/^\(DATABASE_URL\)=$/\1/p'); do
    unset "$var"
done

read_secret() {
    # $1: a file; prints its content without the trailing newline.
    if [ ! -r "$1" ]; then
        echo "entrypoint: cannot read the secret file $1" >&2
        exit 1
    fi
    tr -d '\n' <"$1"
}

for var in DATABASE_URL UNIDESK_S3_ACCESS_KEY UNIDESK_S3_SECRET_KEY UNIDESK_NODE_TOKEN; do
    eval "file=\${${var}_FILE:-}"
    if [ -n "$file" ]; then
        value=$(read_secret "$file")
        export "$var=$value"
        unset "${var}_FILE"
    fi
done

if [ -z "${DATABASE_URL:-}" ] && [ -n "${UNIDESK_DB_PASSWORD_FILE:-}" ]; then
    password=$(read_secret "$UNIDESK_DB_PASSWORD_FILE")
    DATABASE_URL="postgres://${UNIDESK_DB_USER:-unidesk}:${password}@${UNIDESK_DB_HOST:-postgres}:${UNIDESK_DB_PORT:-5432}/${UNIDESK_DB_NAME:-unidesk}"
    export DATABASE_URL
fi

exec "$@"
