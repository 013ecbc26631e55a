# unidesk/agent: `unidesk-agent`, a compute node.
#
# It runs as root: a node's whole job is to drive the host's Docker (build
# images, start and stop task containers, mount their workspaces), through
# the socket bind-mounted at /var/run/docker.sock. Access to that socket is
# root on the host whatever user the agent runs as, so an unprivileged user
# in the group of the socket would add nothing but a group id to keep in
# step with each host. The agent itself opens no port.
FROM debian:bookworm-slim

# openssh-client: --host-ssh (emergency commands on the host).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libssl3 zlib1g ca-certificates openssh-client \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin

COPY bin/unidesk-agent /usr/local/bin/unidesk-agent
COPY entrypoint.sh /usr/local/bin/unidesk-entrypoint

ARG VERSION=dev REVISION=unknown SOURCE=unknown CREATED=unknown PROFILE=release
LABEL org.opencontainers.image.title="unidesk/agent" \
      org.opencontainers.image.description="UniDesk node agent: runs tasks in the host's Docker" \
      org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.revision="$REVISION" \
      org.opencontainers.image.source="$SOURCE" \
      org.opencontainers.image.created="$CREATED" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.unidesk.build-profile="$PROFILE"

# The work directory must be bind-mounted at the same path inside and
# outside: the host's Docker resolves the task containers' bind mounts.
ENV UNIDESK_WORK_DIR=/var/lib/unidesk-node
ENTRYPOINT ["/usr/local/bin/unidesk-entrypoint", "/usr/local/bin/unidesk-agent"]
