# unidesk/gateway: Caddy from Debian in front of UniDesk. TLS (from files,
# or automatic certificates for a public name), HTTP/2, HTTP redirected to
# HTTPS, the web view and API on 443, agents' WebSockets (wss) on 8443 and
# the object store's presigned URLs on 9443. Runs as the user caddy; the
# low ports are bound through the container's unprivileged port range.
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends caddy ca-certificates \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && install -d -o caddy -g caddy -m 0750 /data /config

COPY Caddyfile /etc/caddy/Caddyfile
COPY healthcheck.sh /usr/local/bin/unidesk-healthcheck

ARG VERSION=dev REVISION=unknown SOURCE=unknown CREATED=unknown PROFILE=release
LABEL org.opencontainers.image.title="unidesk/gateway" \
      org.opencontainers.image.description="UniDesk gateway: Caddy with TLS in front of the server, ingress and object store" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.created="$CREATED" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV XDG_DATA_HOME=/data XDG_CONFIG_HOME=/config
USER caddy:caddy
EXPOSE 80 443 8443 9443
ENTRYPOINT ["/usr/bin/caddy"]
CMD ["run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"]
