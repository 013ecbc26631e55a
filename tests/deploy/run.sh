#!/usr/bin/env bash
# The deployment's system test: UniDesk from compose.yml, as an operator
# runs it, checked from outside through its gateway.
#
#   bash tests/deploy/run.sh
#
# It builds the images (ops/images.sh, debug binaries unless
# UNIDESK_IMAGE_PROFILE=release), makes a private CA with openssl and the
# secrets, starts the whole compose project under a unique name with the
# gateway on free ports of 127.0.0.1, and then:
#   1. waits for health; plain HTTP is redirected to HTTPS, HTTPS speaks
#      HTTP/2 and is trusted only through the CA (curl --cacert);
#   2. creates a user and a project through the gateway, and submits a task
#      whose code and environment come from a git daemon inside the compose
#      network; the built-in node runs it to success and its output is
#      downloaded from the object store through the gateway;
#   3. joins a second agent from outside with the one `docker run` line of
#      the README (wss with --ca-file), and sees it online;
#   4. upgrades the node's agent (the agent image under a second tag) while
#      a task runs; the task completes as attempt 1, adopted;
#   5. takes a backup, `down` (volumes kept) and `up` with two server
#      replicas: everything is still there; restores the backup with ops/restore.sh into a new volume:
#      the same event count and final hash.
# Everything it made is removed at the end, also on failure
# (DEPLOY_KEEP=1 keeps the project running for a look after a failure;
# DEPLOY_SKIP_IMAGES=1 uses the images ops/images.sh built before).
#
# Needs Docker, docker-compose (1.29, or DOCKER_COMPOSE="docker compose"),
# openssl, curl, jq, git, and root for debootstrap when debian:bookworm-slim
# is missing.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/../.."
ROOT=$PWD
T0=$SECONDS

export UNIDESK_IMAGE_PROFILE=${UNIDESK_IMAGE_PROFILE:-debug}
read -r -a COMPOSE_CMD <<<"${DOCKER_COMPOSE:-docker-compose}"
ID=$(od -An -N4 -tx1 /dev/urandom | tr -d ' \n')
PROJECT=unideskdeploy$ID
TMP=$(mktemp -d /tmp/unidesk-deploy.XXXXXX)
DOMAIN=unidesk.test
STEP=setup
EXT_AGENT=""
RESTORE_VOLUME=""
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
AGENT_A=deploy-a-$ID
AGENT_B=deploy-b-$ID

say() { printf '[%4ds] %s\n' "$((SECONDS - T0))" "$*" >&2; }
step() {
    STEP=$1
    say "== $STEP"
}
fail() {
    say "FAILED: $*"
    exit 1
}

compose() { "${COMPOSE_CMD[@]}" -p "$PROJECT" -f "$ROOT/compose.yml" -f "$ROOT/tests/deploy/compose.test.yml" "$@"; }

cleanup() {
    local status=$?
    if ((status != 0)); then
        say "deploy test FAILED at: $STEP (exit status $status)"
        compose ps >&2 2>/dev/null || true
        compose logs --no-color --tail=40 >&2 2>/dev/null || true
        [[ -n $EXT_AGENT ]] && docker logs --tail 20 "$EXT_AGENT" >&2 2>/dev/null
        if [[ ${DEPLOY_KEEP:-0} == 1 ]]; then
            say "DEPLOY_KEEP=1: left running as compose project $PROJECT, files in $TMP"
            exit "$status"
        fi
    fi
    [[ -n $EXT_AGENT ]] && docker rm -f "$EXT_AGENT" >/dev/null 2>&1
    compose down -v --remove-orphans -t 5 >/dev/null 2>&1 || true
    # Task containers the agents left behind (they carry the node's work
    # directory in their mounts).
    docker ps -aq --filter "label=unidesk.task_id" 2>/dev/null | while read -r c; do
        if docker inspect -f '{{range .Mounts}}{{.Source}} {{end}}' "$c" | grep -q "$TMP"; then
            docker rm -f "$c" >/dev/null 2>&1 || true
        fi
    done
    [[ -n $RESTORE_VOLUME ]] && docker volume rm "$RESTORE_VOLUME" >/dev/null 2>&1
    docker rmi "unidesk/agent:$AGENT_A" "unidesk/agent:$AGENT_B" >/dev/null 2>&1 || true
    rm -rf -- "$TMP"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# A TCP port of 127.0.0.1 that nothing listens on.
free_port() {
    local port _
    for _ in $(seq 1 200); do
        port=$((20000 + RANDOM % 40000))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && [[ " ${PORTS[*]:-} " != *" $port "* ]]; then
            PORTS+=("$port")
            printf '%s\n' "$port"
            return 0
        fi
    done
    return 1
}

# until_ok DEADLINE_S WHAT CMD...: runs CMD every half second until it
# succeeds, failing the test naming WHAT after DEADLINE_S seconds.
until_ok() {
    local deadline=$((SECONDS + $1)) what=$2
    shift 2
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || fail "timed out after $((SECONDS - deadline + $1)) s waiting for $what"
        sleep 0.5
    done
}

for tool in docker openssl curl jq git "${COMPOSE_CMD[0]}"; do
    command -v "$tool" >/dev/null 2>&1 || fail "$tool not found"
done

# ---------------------------------------------------------------------------
step "images ($UNIDESK_IMAGE_PROFILE)"
t=$SECONDS
if [[ ${DEPLOY_SKIP_IMAGES:-0} == 1 ]]; then
    say "DEPLOY_SKIP_IMAGES=1: using the images built before"
else
    bash ops/images.sh
fi
# The agent twice more, under two tags of distinct images (the created
# label differs): the node starts on the first and is upgraded to the
# second while a task runs.
UNIDESK_IMAGE_CREATED=2000-01-01T00:00:00Z bash ops/images.sh --only agent --no-cargo --tag "$AGENT_A"
UNIDESK_IMAGE_CREATED=2000-01-02T00:00:00Z bash ops/images.sh --only agent --no-cargo --tag "$AGENT_B"
[[ $(docker image inspect -f '{{.Id}}' "unidesk/agent:$AGENT_A") != $(docker image inspect -f '{{.Id}}' "unidesk/agent:$AGENT_B") ]] ||
    fail "the two agent tags are the same image"
for image in server agent gateway postgres; do
    labels=$(docker image inspect -f '{{json .Config.Labels}}' "unidesk/$image:$VERSION")
    for key in version revision source created; do
        jq -e --arg k "org.opencontainers.image.$key" 'has($k) and (.[$k] | length > 0)' <<<"$labels" >/dev/null ||
            fail "unidesk/$image:$VERSION has no org.opencontainers.image.$key label"
    done
done
[[ $(docker image inspect -f '{{.Config.User}}' "unidesk/server:$VERSION") == unidesk:unidesk ]] ||
    fail "unidesk/server does not run as unidesk"
say "images ready in $((SECONDS - t)) s"

# ---------------------------------------------------------------------------
step "a private CA, the secrets, the git repositories"
mkdir -p "$TMP/tls" "$TMP/git" "$TMP/src" "$TMP/work"
chmod 0755 "$TMP"
(
    cd "$TMP/tls"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=UniDesk deploy test CA" \
        -keyout ca.key -out ca.pem 2>/dev/null
    openssl req -newkey rsa:2048 -nodes -subj "/CN=$DOMAIN" -keyout key.pem -out server.csr 2>/dev/null
    printf 'subjectAltName=DNS:%s\nextendedKeyUsage=serverAuth\n' "$DOMAIN" >ext.cnf
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 \
        -extfile ext.cnf -out cert.pem 2>/dev/null
    rm -f ca.key server.csr ext.cnf ca.srl
    chmod 0644 ./*.pem
)
bash ops/secrets.sh "$TMP/secrets" >/dev/null
# Two repositories: the code (a script) and the environment (a Dockerfile
# from the local base image: nothing is pulled).
make_repo() {
    local name=$1
    shift
    git init -q "$TMP/src/$name"
    (cd "$TMP/src/$name" && "$@" && git add -A &&
        git -c user.name=test -c user.email=test@example.invalid commit -qm "$name")
    git clone -q --bare "$TMP/src/$name" "$TMP/git/$name.git"
}
write_code() {
    cat >run.sh <<'SH'
echo "hello from the deployment"
echo "$(id -u) $(uname -s)" > result.txt
SH
    cat >wait.sh <<'SH'
echo "waiting for go"
while [ ! -e go ]; do sleep 0.2; done
echo "went on after the agent's upgrade"
echo "after the upgrade" > result.txt
SH
}
write_env() { printf 'FROM debian:bookworm-slim\n' >Dockerfile; }
make_repo code write_code
make_repo env write_env
chmod -R a+rX "$TMP/git"
CODE_COMMIT=$(git -C "$TMP/src/code" rev-parse HEAD)
ENV_COMMIT=$(git -C "$TMP/src/env" rev-parse HEAD)

PORTS=()
HTTP_PORT=$(free_port)
HTTPS_PORT=$(free_port)
AGENT_PORT=$(free_port)
OBJECTS_PORT=$(free_port)
export UNIDESK_VERSION=$VERSION UNIDESK_AGENT_VERSION=$AGENT_A
export UNIDESK_DOMAIN=$DOMAIN UNIDESK_TLS=files UNIDESK_TLS_DIR=$TMP/tls
export UNIDESK_BIND_ADDRESS=127.0.0.1 UNIDESK_HTTP_PORT=$HTTP_PORT UNIDESK_HTTPS_PORT=$HTTPS_PORT
export UNIDESK_AGENT_PORT=$AGENT_PORT UNIDESK_OBJECTS_PORT=$OBJECTS_PORT
export UNIDESK_S3_PUBLIC_ENDPOINT=https://$DOMAIN:$OBJECTS_PORT
export UNIDESK_SECRETS_DIR=$TMP/secrets UNIDESK_NODE_WORK_DIR=$TMP/work UNIDESK_NODE_NAME=local
export DEPLOY_GIT_DIR=$TMP/git
unset UNIDESK_S3_ENDPOINT UNIDESK_NODE_CA_FILE

BASE=https://$DOMAIN:$HTTPS_PORT
API=$BASE/api/v1
RESOLVE=(--resolve "$DOMAIN:$HTTPS_PORT:127.0.0.1" --resolve "$DOMAIN:$HTTP_PORT:127.0.0.1"
    --resolve "$DOMAIN:$OBJECTS_PORT:127.0.0.1" --resolve "$DOMAIN:$AGENT_PORT:127.0.0.1")
CURL=(curl -sS --max-time 30 --cacert "$TMP/tls/ca.pem" "${RESOLVE[@]}")
TOKEN=""
# api METHOD PATH [JSON]: one API call through the gateway, as TOKEN;
# prints the body, fails on a status of 400 or more.
api() {
    local args=(-X "$1" -H "Authorization: Bearer $TOKEN" --fail-with-body)
    if (($# > 2)); then args+=(-H 'content-type: application/json' -d "$3"); fi
    "${CURL[@]}" "${args[@]}" "$API$2"
}

# ---------------------------------------------------------------------------
step "docker-compose up -d (project $PROJECT)"
t=$SECONDS
compose up -d --quiet-pull 2>&1 | grep -v -e '^Creating' -e '^Starting' >&2 || true
healthy() { [[ $("${CURL[@]}" -o /dev/null -w '%{http_code}' "$BASE/healthz") == 200 ]]; }
until_ok 180 "the API through the gateway" healthy
admin_token() { compose exec -T server cat /var/lib/unidesk/state/admin.token; }
until_ok 60 "the admin token" admin_token
TOKEN=$(admin_token | tr -d '\r\n')
say "up and healthy in $((SECONDS - t)) s"
compose ps >&2

# Only the gateway publishes ports.
for service in postgres server ingress objects backup node init; do
    published=$(docker ps -a --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$service" --format '{{.Ports}}' | grep -c -- '->' || true)
    ((published == 0)) || fail "$service publishes a port"
done

# ---------------------------------------------------------------------------
step "TLS, HTTP/2, the redirect from HTTP"
read -r code location < <(curl -sS --max-time 10 "${RESOLVE[@]}" -o /dev/null -w '%{http_code} %{redirect_url}\n' \
    "http://$DOMAIN:$HTTP_PORT/api/v1/projects")
[[ $code =~ ^30[178]$ && $location == "https://$DOMAIN:$HTTPS_PORT/api/v1/projects" ]] ||
    fail "plain HTTP answered $code $location, not a redirect to HTTPS"
version=$("${CURL[@]}" -o /dev/null -w '%{http_version}' "$BASE/healthz")
[[ $version == 2 ]] || fail "HTTPS spoke HTTP/$version, not HTTP/2"
if curl -sS --max-time 10 "${RESOLVE[@]}" -o /dev/null "$BASE/healthz" 2>/dev/null; then
    fail "the gateway's certificate was trusted without the private CA"
fi
"${CURL[@]}" --fail -o /dev/null "$BASE/" || fail "the web view is not served"
say "HTTP $code to $location; HTTP/$version over TLS from the private CA"

# ---------------------------------------------------------------------------
step "a user, a project and a task from the git daemon"
api POST /users '{"name":"alice"}' >/dev/null
ALICE=$(api POST /users/alice/tokens '{"label":"deploy test"}' | jq -r .token)
[[ -n $ALICE && $ALICE != null ]] || fail "no token for alice"
PROJECT_ID=$(api POST /projects '{"name":"deploy","description":"the deployment test"}' | jq -r .id)
api POST "/projects/$PROJECT_ID/members" '{"user":"alice","role":"member"}' >/dev/null
# The server has its secrets key: a project secret can be set.
[[ $(api PUT "/projects/$PROJECT_ID/secrets/deploy-check" '{"value":"check-Hh4Jj6Kk8Ll0"}' | jq -r .version) == 1 ]] ||
    fail "a project secret could not be set: the server has no secrets key"
ADMIN=$TOKEN
TOKEN=$ALICE
task_json() {
    jq -n --arg p "$PROJECT_ID" --arg c "$CODE_COMMIT" --arg e "$ENV_COMMIT" --arg script "$1" '{
        project_id: $p,
        code_repo_url: "git://git/code.git", code_commit_id: $c,
        env_repo_url: "git://git/env.git", env_commit_id: $e,
        dockerfile_path: "Dockerfile", command: ["sh", $script],
        outputs: [{name: "result", path: "result.txt"}],
        timeout_s: 600, max_retries: 0
    }'
}
state_of() { api GET "/tasks/$1" | jq -r .state; }
# wait_state TASK STATE DEADLINE_S: fails at once on another final state.
wait_state() {
    local deadline=$((SECONDS + $3)) state
    while :; do
        state=$(state_of "$1")
        [[ $state == "$2" ]] && return 0
        case $state in
        succeeded | failed | cancelled | timed_out | lost)
            api GET "/tasks/$1" >&2
            api GET "/tasks/$1/logs" >&2 || true
            fail "task $1 ended $state, not $2"
            ;;
        esac
        ((SECONDS < deadline)) || fail "task $1 still $state after $3 s (waiting for $2)"
        sleep 0.5
    done
}
t=$SECONDS
TASK1=$(api POST /tasks "$(task_json run.sh)" | jq -r .id)
wait_state "$TASK1" succeeded 300
api GET "/tasks/$TASK1/logs" | jq -r .data | grep -q "hello from the deployment" || fail "task 1's output is not in its log"
ARTIFACT=$(api GET "/tasks/$TASK1/artifacts" | jq -r '.items[] | select(.name == "result") | .id')
[[ -n $ARTIFACT ]] || fail "task 1 stored no result"
# The download is a redirect to a presigned URL of the object store,
# through the gateway's objects port.
result=$("${CURL[@]}" --fail -L -H "Authorization: Bearer $TOKEN" "$API/artifacts/$ARTIFACT/download")
[[ $result == *Linux* ]] || fail "the downloaded result is '$result'"
NODE_ID=$(TOKEN=$ADMIN api GET /nodes | jq -r '.items[] | select(.name == "local") | .id')
[[ $(api GET "/tasks/$TASK1" | jq -r .node_id) == "$NODE_ID" ]] || fail "task 1 did not run on the built-in node"
say "task 1 succeeded on the built-in node in $((SECONDS - t)) s; its output came back from the store: $result"

# ---------------------------------------------------------------------------
step "metrics through the gateway"
scraped=$("${CURL[@]}" --fail "$BASE/metrics") || fail "no /metrics through the gateway"
grep -Eq '^unidesk_tasks\{state="succeeded"\} [1-9]' <<<"$scraped" ||
    fail "/metrics does not count the succeeded task"
grep -q '^unidesk_http_requests_total{' <<<"$scraped" || fail "/metrics counts no HTTP request"
if command -v promtool >/dev/null; then
    promtool check metrics <<<"$scraped" >&2 || fail "promtool refuses the metrics"
fi
say "$(grep -c '^unidesk_' <<<"$scraped") unidesk_ samples, the succeeded task counted"

# ---------------------------------------------------------------------------
step "a node joins from outside: docker run, wss, --ca-file"
TOKEN=$ADMIN
EXT_TOKEN=$(api POST /nodes '{"name":"outside","labels":{"where":"outside"}}' | jq -r .token)
EXT_ID=$(api GET /nodes | jq -r '.items[] | select(.name == "outside") | .id')
mkdir -p "$TMP/outside"
(umask 022 && printf '%s\n' "$EXT_TOKEN" >"$TMP/outside/node.token")
EXT_AGENT=$PROJECT-outside
# The README's line, with the host network and the name resolved to the
# gateway's published address.
docker run -d --name "$EXT_AGENT" --restart unless-stopped \
    --network host --add-host "$DOMAIN:127.0.0.1" \
    -v /var/run/docker.sock:/var/run/docker.sock \
    -v "$TMP/outside:$TMP/outside" \
    -v "$TMP/tls/ca.pem:/etc/unidesk/ca.pem:ro" \
    "unidesk/agent:$VERSION" \
    --server "wss://$DOMAIN:$AGENT_PORT" --ca-file /etc/unidesk/ca.pem \
    --token-file "$TMP/outside/node.token" --work-dir "$TMP/outside" >/dev/null
node_online() { [[ $(api GET "/nodes/$1" | jq -r .status) == online ]]; }
until_ok 60 "the outside node online" node_online "$EXT_ID"
say "node 'outside' online through wss://$DOMAIN:$AGENT_PORT"
# Out of the way of the next steps: placed tasks must go to the built-in node.
api POST "/nodes/$EXT_ID/revoke" >/dev/null
docker rm -f "$EXT_AGENT" >/dev/null
EXT_AGENT=""

# ---------------------------------------------------------------------------
step "rolling agent upgrade while a task runs"
TOKEN=$ALICE
TASK2=$(api POST /tasks "$(task_json wait.sh)" | jq -r .id)
wait_state "$TASK2" running 300
logged() { api GET "/tasks/$1/logs" | jq -r .data | grep -q "$2"; }
until_ok 60 "task 2 waiting" logged "$TASK2" "waiting for go"
connected_before=$(TOKEN=$ADMIN api GET "/nodes/$NODE_ID" | jq -r .connected_at)
before=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=node")
UNIDESK_AGENT_VERSION=$AGENT_B compose up -d --no-deps node 2>&1 | grep -v -e '^Recreating' >&2 || true
after=$(docker ps -q --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=node")
[[ -n $after && $after != "$before" ]] || fail "the node container was not replaced"
[[ $(docker inspect -f '{{.Config.Image}}' "$after") == "unidesk/agent:$AGENT_B" ]] || fail "the node does not run the second tag"
reconnected() {
    [[ $(TOKEN=$ADMIN api GET "/nodes/$NODE_ID" | jq -r '.status + " " + .connected_at') == "online "* &&
        $(TOKEN=$ADMIN api GET "/nodes/$NODE_ID" | jq -r .connected_at) != "$connected_before" ]]
}
until_ok 60 "the upgraded agent connected" reconnected
node_up_again() { [[ $(TOKEN=$ADMIN api GET "/nodes/$NODE_ID" | jq -r .status) == online ]]; }
[[ $(state_of "$TASK2") == running ]] || fail "task 2 is $(state_of "$TASK2") after the upgrade"
# Let the task finish: it waits for a file in its workspace.
go_file() {
    local script
    script=$(find "$TMP/work/tasks" -name wait.sh -path "*$TASK2*" 2>/dev/null | head -n 1)
    [[ -n $script ]] && touch "$(dirname "$script")/go"
}
until_ok 30 "task 2's workspace" go_file
wait_state "$TASK2" succeeded 120
attempts=$(api GET "/tasks/$TASK2" | jq '[.attempts[]] | length')
attempt=$(api GET "/tasks/$TASK2" | jq -r .attempt)
((attempts == 1 && attempt == 1)) || fail "task 2 ran $attempts attempt(s), the last $attempt: not adopted"
logged "$TASK2" "went on after the agent's upgrade" || fail "task 2's log lacks its end"
say "task 2 succeeded as attempt 1 across the agent upgrade $AGENT_A -> $AGENT_B"

# ---------------------------------------------------------------------------
step "backup"
TOKEN=$ADMIN
# Nothing writes while the dump is taken, so that its events are exactly
# those exported here.
compose stop -t 20 node ingress server 2>&1 | grep -v '^Stopping' >&2 || true
compose run --rm --no-deps -T server events export >"$TMP/before.jsonl" 2>"$TMP/before.err" ||
    fail "events export failed: $(cat "$TMP/before.err")"
BEFORE=$(grep '^exported ' "$TMP/before.err")
out=$(compose exec -T backup unidesk-backup now | tr -d '\r')
dump=$(tail -n 1 <<<"$out")
[[ $dump == /backups/unidesk-*.dump ]] || fail "the backup printed '$out'"
grep "$(basename "$dump"): [0-9]* bytes .* in [0-9]* ms" <<<"$out" >&2 ||
    fail "the backup's log lacks its size and duration: $out"
docker cp "$(compose ps -q backup):$dump" "$TMP/backup.dump"
say "$(basename "$dump"): $(stat -c %s "$TMP/backup.dump") bytes; events: $BEFORE"

# ---------------------------------------------------------------------------
step "down (volumes kept), up: everything still there"
t=$SECONDS
compose down -t 20 2>&1 | grep -v -e '^Stopping' -e '^Removing' >&2 || true
# Back with two server replicas: the gateway finds both through Docker's DNS.
compose up -d --scale server=2 2>&1 | grep -v -e '^Creating' -e '^Starting' >&2 || true
until_ok 180 "the API after up" healthy
servers_healthy() {
    local ids
    ids=$(compose ps -q server)
    (($(wc -l <<<"$ids") == 2)) || return 1
    for c in $ids; do [[ $(docker inspect -f '{{.State.Health.Status}}' "$c") == healthy ]] || return 1; done
}
until_ok 60 "two healthy server replicas" servers_healthy
for _ in $(seq 1 20); do
    [[ $("${CURL[@]}" -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $ADMIN" "$API/projects/$PROJECT_ID") == 200 ]] ||
        fail "a request through the gateway to two replicas failed"
done
[[ $(admin_token | tr -d '\r\n') == "$ADMIN" ]] || fail "the admin token changed"
api GET /users/alice >/dev/null || fail "alice is gone"
[[ $(api GET "/projects/$PROJECT_ID" | jq -r .name) == deploy ]] || fail "the project is gone"
[[ $(state_of "$TASK1") == succeeded && $(state_of "$TASK2") == succeeded ]] || fail "the tasks are not as they were"
until_ok 60 "the built-in node online again with its kept token" node_up_again
say "back in $((SECONDS - t)) s, two server replicas, with the same users, project, tasks, tokens"

# ---------------------------------------------------------------------------
step "restore the backup into a new volume"
RESTORE_VOLUME=unidesk-restore-$ID
restored=$(bash ops/restore.sh --volume "$RESTORE_VOLUME" --export "$TMP/after.jsonl" "$TMP/backup.dump" 2>&1) || {
    printf '%s\n' "$restored" >&2
    fail "ops/restore.sh failed"
}
printf '%s\n' "$restored" | sed 's/^/    /' >&2
# The same events: the same count, and the same event lines (every stored
# column, in the log's order). The final hashes themselves differ: each
# export's header holds the time it was made, where the chain starts. So
# the event lines are compared, without their chained hashes.
events_digest() {
    printf '%s %s\n' "$(grep -c '^{"position"' "$1")" \
        "$(grep '^{"position"' "$1" | sed 's/,"hash":"[0-9a-f]*"}$//' | sha256sum | cut -d' ' -f1)"
}
read -r n_before h_before < <(events_digest "$TMP/before.jsonl")
read -r n_after h_after < <(events_digest "$TMP/after.jsonl")
AFTER=$(grep '^exported ' <<<"$restored")
((n_before > 0)) || fail "no events exported before the backup"
[[ $n_before == "$n_after" && $h_before == "$h_after" ]] ||
    fail "the restored events differ: $n_after events, digest $h_after, against $n_before, $h_before"
say "restored: $n_after events, the same as before the backup (digest $h_after); $AFTER"

STEP=done
say "deploy test passed in $((SECONDS - T0)) s"
