# unidesk/postgres: PostgreSQL 15 from Debian, for UniDesk's compose
# deployment (no image is pulled). On first start with an empty data
# directory it creates the cluster, the user POSTGRES_USER with the password
# in POSTGRES_PASSWORD_FILE, and the database POSTGRES_DB. Runs as postgres.
# The same image runs the backups (pg_dump) and the restores.
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends postgresql-15 postgresql-client-15 \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 # LLVM is only for JIT compilation of queries, which UniDesk's short
 # queries do not gain from (jit=off below): it is most of the image.
 && rm -f /usr/lib/postgresql/15/lib/llvmjit*.so \
 && rm -rf /usr/lib/postgresql/15/lib/bitcode \
 && dpkg --purge --force-depends libllvm14 libz3-4 \
 && install -d -o postgres -g postgres -m 0700 /var/lib/postgresql/data \
 && install -d -o postgres -g postgres -m 0755 /var/run/postgresql /backups

COPY postgres-entrypoint.sh /usr/local/bin/postgres-entrypoint
COPY backup.sh /usr/local/bin/unidesk-backup

ARG VERSION=dev REVISION=unknown SOURCE=unknown CREATED=unknown PROFILE=release
LABEL org.opencontainers.image.title="unidesk/postgres" \
      org.opencontainers.image.description="PostgreSQL 15 from Debian, with UniDesk's backup script" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.created="$CREATED"

ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
USER postgres:postgres
EXPOSE 5432
STOPSIGNAL SIGINT
ENTRYPOINT ["/usr/local/bin/postgres-entrypoint"]
CMD ["postgres"]
