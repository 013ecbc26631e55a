# unidesk/git: serves the repositories under /srv/git read-only with
# `git daemon` (git://HOST/NAME), for tests of a deployment. Runs as nobody.
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends git \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin \
 && install -d -m 0755 /srv/git

ARG VERSION=dev REVISION=unknown SOURCE=unknown CREATED=unknown PROFILE=release
LABEL org.opencontainers.image.title="unidesk/git" \
      org.opencontainers.image.description="git daemon serving /srv/git read-only" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.created="$CREATED"

USER nobody:nogroup
EXPOSE 9418
ENTRYPOINT ["git", "-c", "safe.directory=*", "daemon", "--reuseaddr", "--export-all", "--base-path=/srv/git", "--informative-errors"]
CMD ["/srv/git"]
