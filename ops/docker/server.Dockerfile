# unidesk/server: the `unidesk` binary. One image for every server role
# (`serve --roles …`), the object store (`objects`), migrations and the
# admin commands. Runs as the unprivileged user unidesk (uid 10001).
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 zlib1g ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/unidesk --shell /usr/sbin/nologin unidesk \
 && install -d -o unidesk -g unidesk -m 0750 /var/lib/unidesk /var/lib/unidesk/state /var/lib/unidesk/objects /var/lib/unidesk/node

COPY bin/unidesk /usr/local/bin/unidesk
COPY entrypoint.sh /usr/local/bin/unidesk-entrypoint
COPY healthcheck.sh /usr/local/bin/unidesk-healthcheck

ARG VERSION=dev REVISION=unknown SOURCE=unknown CREATED=unknown PROFILE=release
LABEL org.opencontainers.image.title="unidesk/server" \
      org.opencontainers.image.description="UniDesk server: API, projector, ingress, scheduler, object store" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.created="$CREATED" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.unidesk.build-profile="$PROFILE"

USER unidesk:unidesk
WORKDIR /var/lib/unidesk
EXPOSE 8080 9000
ENTRYPOINT ["/usr/local/bin/unidesk-entrypoint", "/usr/local/bin/unidesk"]
CMD ["serve"]
