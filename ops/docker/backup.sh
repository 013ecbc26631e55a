#!/bin/bash
# unidesk-backup: dumps UniDesk's database with pg_dump into /backups.
#
#   unidesk-backup now       one dump, at once
#   unidesk-backup daily     a dump every day at UNIDESK_BACKUP_AT (HH:MM,
#                            in the container's TZ, UTC by default), forever
#
# Each dump is written as unidesk-<UTC time>.dump (pg_dump's custom format,
# for pg_restore) under a temporary name first, so a dump that failed half
# way never looks like a backup. Only the newest UNIDESK_BACKUP_KEEP (7)
# dumps are kept. Every dump logs its size and how long it took.
#
# The database: PGHOST (postgres), PGPORT, PGUSER (unidesk), PGDATABASE
# (unidesk), and the password in PGPASSWORD_FILE.
set -euo pipefail

DIR=${UNIDESK_BACKUP_DIR:-/backups}
KEEP=${UNIDESK_BACKUP_KEEP:-7}
AT=${UNIDESK_BACKUP_AT:-03:00}
export PGHOST=${PGHOST:-postgres} PGUSER=${PGUSER:-unidesk} PGDATABASE=${PGDATABASE:-unidesk}

log() { printf '%s backup: %s\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$*"; }

if [[ -n ${PGPASSWORD_FILE:-} ]]; then
    PGPASSWORD=$(tr -d '\n' <"$PGPASSWORD_FILE")
    export PGPASSWORD
fi
[[ $KEEP =~ ^[1-9][0-9]*$ ]] || { log "UNIDESK_BACKUP_KEEP must be a positive number, not $KEEP"; exit 2; }
[[ $AT =~ ^([01][0-9]|2[0-3]):[0-5][0-9]$ ]] || { log "UNIDESK_BACKUP_AT must be HH:MM, not $AT"; exit 2; }

dump() {
    local name tmp start end size
    name="unidesk-$(date -u +%Y%m%dT%H%M%SZ).dump"
    tmp="$DIR/.$name.partial"
    start=$(date +%s%N)
    if ! pg_dump --format=custom --compress=6 --file="$tmp"; then
        rm -f -- "$tmp"
        log "FAILED: pg_dump of $PGDATABASE on $PGHOST exited with an error"
        return 1
    fi
    mv -- "$tmp" "$DIR/$name"
    end=$(date +%s%N)
    size=$(stat -c %s "$DIR/$name")
    log "$name: $size bytes ($(numfmt --to=iec --suffix=B "$size")) in $(((end - start) / 1000000)) ms"
    # The newest KEEP dumps stay.
    ls -1 "$DIR"/unidesk-*.dump 2>/dev/null | sort -r | tail -n +"$((KEEP + 1))" | while read -r old; do
        rm -f -- "$old"
        log "removed $(basename "$old") (keeping the newest $KEEP)"
    done
    printf '%s\n' "$DIR/$name"
}

# Seconds until the next AT.
until_next() {
    local now next
    now=$(date +%s)
    next=$(date -d "today $AT" +%s)
    if ((next <= now)); then next=$(date -d "tomorrow $AT" +%s); fi
    echo $((next - now))
}

case ${1:-daily} in
now) dump ;;
daily)
    log "a dump every day at $AT ($(date +%Z)), keeping the newest $KEEP in $DIR"
    trap 'log "stopping"; exit 0' TERM INT
    while :; do
        wait_s=$(until_next)
        log "next dump in ${wait_s} s"
        sleep "$wait_s" &
        wait $! || true
        dump || true
    done
    ;;
*) echo "usage: unidesk-backup now|daily" >&2; exit 2 ;;
esac
