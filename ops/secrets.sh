#!/usr/bin/env bash
# Makes the secret files compose.yml reads, those that do not exist yet:
#
#   DIR/db_password     the database password (hex: safe in a URL)
#   DIR/s3_access_key   the object store's access key id
#   DIR/s3_secret_key   the object store's secret key
#   DIR/secrets_key     the key that seals project secrets (64 hex digits);
#                       keep a copy apart from the backups
#
#   bash ops/secrets.sh [DIR]        # DIR: UNIDESK_SECRETS_DIR, else ./secrets
#
# The directory is for its owner only (0700); the files in it are 0644
# because compose bind-mounts them as they are into containers whose
# processes run as other users (unidesk, postgres). Existing files are
# never changed: the database keeps the password it was created with, so
# changing db_password later needs an ALTER USER as well.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
dir=${1:-${UNIDESK_SECRETS_DIR:-./secrets}}
mkdir -p -- "$dir"
chmod 0700 -- "$dir"

make() {
    local file=$dir/$1 value=$2
    if [[ -s $file ]]; then
        echo "kept    $file"
        return 0
    fi
    (umask 022 && printf '%s\n' "$value" >"$file.new")
    chmod 0644 -- "$file.new"
    mv -- "$file.new" "$file"
    echo "created $file"
}

make db_password "$(openssl rand -hex 24)"
make s3_access_key "unidesk-$(openssl rand -hex 6)"
make s3_secret_key "$(openssl rand -hex 24)"
make secrets_key "$(openssl rand -hex 32)"
