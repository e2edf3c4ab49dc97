#!/usr/bin/env bash
# The stack on Docker Swarm (compose/stack.yaml, docs/swarm.md), against the engine DOCKER_HOST
# names, which must be a swarm manager. The Makefile's swarm-* targets call this.
#
#   compose/scripts/swarm.sh secrets     Docker secrets from the env file (existing ones kept)
#   compose/scripts/swarm.sh up          secrets, then docker stack deploy
#   compose/scripts/swarm.sh down        docker stack rm, wait until its tasks and networks are gone
#   compose/scripts/swarm.sh dashboard   a forwarder on the manager: 127.0.0.1:PORT -> the leader
#   compose/scripts/swarm.sh status      services, their tasks, and where they run
#   compose/scripts/swarm.sh acl         print the Redis ACL file the secret holds (hashes only)
#
# Settings (environment): SWARM_STACK (celery), ENV_FILE (.env), SWARM_DOCKER_GID (the socket's
# group on the managers: read off the manager's socket when unset), SWARM_RESOLVE_IMAGE (always:
# every node runs the digest the registry had at deploy time), SCALER_HTTP_PORT_HOST (9100),
# SWARM_REMOVE_SECRETS=1 (down: also remove the stack's secrets), SWARM_WAIT_S (120),
# SWARM_STACK_FILE (compose/stack.yaml).
# Secrets go to `docker secret create` on stdin (printf is a shell builtin: no password on any
# command line) and nowhere else; .env's other variables are exported for the deploy (an exported
# variable of the same name wins, as with Compose).
set -euo pipefail

cd "$(dirname "$0")/../.."
stack=${SWARM_STACK:-celery}
env_file=${ENV_FILE:-.env}
stack_file=${SWARM_STACK_FILE:-compose/stack.yaml}
wait_s=${SWARM_WAIT_S:-120}
# Variables that hold a password (or a hash only Redis's ACL file needs): never exported.
secret_vars=(REDIS_WORKER_PASSWORD REDIS_SCALER_PASSWORD REDIS_ADMIN_PASSWORD POSTGRES_PASSWORD
  POSTGRES_APP_PASSWORD FLOWER_PASSWORD SCALER_TOKEN)

die() { echo "swarm: $*" >&2; exit 1; }
[[ $stack =~ ^[a-z0-9][a-z0-9_-]{0,30}$ ]] ||
  die "SWARM_STACK='$stack': expected 1-31 of a-z 0-9 _ - starting with a letter or digit"

declare -A file_values=()
read_env_file() {
  [[ -r $env_file ]] || die "$env_file not found: create it with compose/scripts/init-env.sh (make up does)"
  local line name value
  while IFS= read -r line || [[ -n $line ]]; do
    [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
    [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] ||
      die "$env_file: cannot parse line: $line"
    name=${BASH_REMATCH[2]} value=${BASH_REMATCH[3]}
    if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
    file_values[$name]=$value
  done <"$env_file"
}

# The effective value: the exported variable when set, else the file's, else the default.
value_of() {
  local name=$1 default=${2-}
  if [[ -n ${!name-} ]]; then printf '%s' "${!name}"; else printf '%s' "${file_values[$name]:-$default}"; fi
}

require() {
  local name=$1 value
  value=$(value_of "$name")
  [[ -n $value ]] || die "$name is empty in $env_file: expected a secret (compose/scripts/init-env.sh generates it)"
  [[ $value =~ ^[A-Za-z0-9._~-]+$ ]] ||
    die "$name in $env_file: expected URL-safe characters only (A-Z a-z 0-9 . _ ~ -)"
  printf '%s' "$value"
}

require_hash() {
  local name=$1 value
  value=$(value_of "$name")
  [[ $value =~ ^[0-9a-f]{64}$ ]] ||
    die "$name='$value' in $env_file: expected 64 lowercase hex (printf %s PASSWORD | sha256sum)"
  printf '%s' "$value"
}

# Redis's users, as compose.yaml's redis command defines them (tests/swarm/test_stack_files.py
# checks that they match).
redis_acl() {
  local worker scaler admin
  worker=$(require_hash REDIS_WORKER_PASSWORD_SHA256)
  scaler=$(require_hash REDIS_SCALER_PASSWORD_SHA256)
  admin=$(require_hash REDIS_ADMIN_PASSWORD_SHA256)
  printf '%s\n' \
    "user default off" \
    "user healthcheck on nopass -@all +ping" \
    "user admin on #$admin ~* &* +@all" \
    "user scaler on #$scaler ~* &* +@all -@dangerous -function" \
    "user worker on #$worker ~? ~?? ~??? ~???? ~????? ~?????? ~[^ls]* ~l[^e]* ~le[^a]* ~lea[^d]* ~lead[^e]* ~leade[^r]* ~leader[^:]* ~s[^c]* ~sc[^a]* ~sca[^l]* ~scal[^e]* ~scale[^r]* ~scaler[^:]* &* +@all -@dangerous -function"
}

create_secret() {
  local name="${stack}_$1" value=$2
  if docker secret inspect "$name" >/dev/null 2>&1; then
    echo "swarm: secret $name exists, kept (secrets are immutable: see docs/swarm.md to rotate)"
    return
  fi
  printf '%s' "$value" | docker secret create --label "celery-stack.swarm=$stack" "$name" - >/dev/null
  echo "swarm: secret $name created"
}

cmd_secrets() {
  read_env_file
  local worker scaler owner app_user app db
  worker=$(require REDIS_WORKER_PASSWORD)
  scaler=$(require REDIS_SCALER_PASSWORD)
  owner=$(require POSTGRES_PASSWORD)
  app=$(require POSTGRES_APP_PASSWORD)
  token=$(require SCALER_TOKEN)
  app_user=$(value_of POSTGRES_APP_USER celery_app)
  db=$(value_of POSTGRES_DB celery)
  create_secret redis_acl "$(redis_acl)"
  create_secret postgres_password "$owner"
  create_secret postgres_app_password "$app"
  create_secret broker_url_worker "redis://worker:$worker@redis:6379/0"
  create_secret result_backend_worker "redis://worker:$worker@redis:6379/1"
  create_secret broker_url_scaler "redis://scaler:$scaler@redis:6379/0"
  create_secret result_backend_scaler "redis://scaler:$scaler@redis:6379/1"
  create_secret database_url_app "postgresql://$app_user:$app@postgres:5432/$db"
  create_secret database_url_owner "postgresql://$(value_of POSTGRES_USER celery):$owner@postgres:5432/$db"
  create_secret scaler_token "$token"
}

# .env's non-secret variables into the environment (an exported one wins), for the deploy.
export_settings() {
  local name
  for name in "${!file_values[@]}"; do
    [[ " ${secret_vars[*]} " == *" $name "* || $name == *_SHA256 ]] && continue
    [[ -n ${!name-} ]] && continue
    export "$name=${file_values[$name]}"
  done
}

# The Docker socket's group on the manager DOCKER_HOST names (docker-proxy runs in that group).
socket_gid() {
  if [[ -n ${SWARM_DOCKER_GID:-} ]]; then printf '%s' "$SWARM_DOCKER_GID"; return; fi
  docker run --rm --user 0 --network none -v /var/run/docker.sock:/var/run/docker.sock:ro \
    --entrypoint stat "$DOCKER_PROXY_IMAGE" -c %g /var/run/docker.sock ||
    die "cannot read the Docker socket's group on the manager: set SWARM_DOCKER_GID"
}

cmd_up() {
  cmd_secrets
  export_settings
  export SWARM_STACK=$stack
  [[ -n ${APP_IMAGE:-} && -n ${DOCKER_PROXY_IMAGE:-} ]] ||
    die "APP_IMAGE and DOCKER_PROXY_IMAGE must name images in a registry every node reaches"
  DOCKER_GID=$(socket_gid)
  export DOCKER_GID
  local policy=${SCALER_POLICY_FILE:-./scaler-policy.yaml}
  [[ $policy == /* ]] || policy=compose/${policy#./}
  [[ -r $policy ]] || die "SCALER_POLICY_FILE: cannot read $policy"
  SCALER_POLICY_SHA=$(sha256sum "$policy" | cut -c1-12)
  export SCALER_POLICY_SHA
  docker stack deploy --prune --resolve-image "${SWARM_RESOLVE_IMAGE:-always}" \
    --compose-file "$stack_file" "$stack"
  echo
  echo "swarm: stack $stack deployed. Watch it converge:"
  echo "  make swarm-status                    services, replicas and where each task runs"
  echo "  make swarm-dashboard                 the scaler's dashboard on 127.0.0.1:${SCALER_HTTP_PORT_HOST:-9100} of the manager"
}

cmd_down() {
  docker rm -f "${stack}-dashboard" >/dev/null 2>&1 || true
  docker stack rm "$stack"
  local deadline=$((SECONDS + wait_s))
  # Services go at once; their tasks stop within their grace period, then the networks go.
  while docker network ls -q --filter "label=com.docker.stack.namespace=$stack" | grep -q . ||
    docker ps -q --filter "label=com.docker.stack.namespace=$stack" | grep -q .; do
    ((SECONDS < deadline)) || die "stack $stack still has tasks or networks after ${wait_s}s"
    sleep 1
  done
  echo "swarm: stack $stack removed (volumes on the nodes kept)"
  if [[ ${SWARM_REMOVE_SECRETS:-0} == 1 ]]; then
    local ids
    ids=$(docker secret ls -q --filter "label=celery-stack.swarm=$stack")
    [[ -z $ids ]] || docker secret rm $ids >/dev/null
    echo "swarm: the stack's secrets removed"
  fi
}

# HAProxy from the docker-proxy image, started with plain `docker run` (which, unlike a Swarm
# service, can bind to the manager's loopback), on the attachable `ops` network: it forwards to
# whichever scaler /status reports as the leader, else to either one.
cmd_dashboard() {
  read_env_file
  export_settings
  local port=${SCALER_HTTP_PORT_HOST:-9100} image=${DOCKER_PROXY_IMAGE:?set DOCKER_PROXY_IMAGE}
  local cfg
  cfg=$(cat <<EOF
global
    log stdout format raw daemon warning
defaults
    mode http
    log global
    timeout connect 5s
    timeout client 1h
    timeout server 1h
resolvers docker
    nameserver dns 127.0.0.11:53
    hold valid 2s
backend scalers
    option httpchk GET /status
    http-check expect rstring "role\"\\\\s*:\\\\s*\"(leader|single)"
    server-template leader 2 tasks.${stack}_scaler:9808 check inter 2s resolvers docker init-addr none
    server any ${stack}_scaler:9808 backup resolvers docker init-addr none
frontend dashboard
    bind :9100
    default_backend scalers
EOF
)
  docker rm -f "${stack}-dashboard" >/dev/null 2>&1 || true
  docker run -d --rm --name "${stack}-dashboard" --network "${stack}_ops" \
    -p "127.0.0.1:$port:9100" --read-only --tmpfs /tmp:size=1m --cap-drop ALL \
    --security-opt no-new-privileges --user haproxy -e "CFG=$cfg" \
    --entrypoint sh "$image" -c 'printf "%s\n" "$CFG" >/tmp/haproxy.cfg && exec haproxy -db -f /tmp/haproxy.cfg' >/dev/null
  echo "swarm: the scaler's dashboard: http://127.0.0.1:$port/ on the manager (make swarm-dashboard-stop: docker rm -f ${stack}-dashboard)"
}

cmd_status() {
  docker stack services "$stack"
  echo
  docker stack ps --filter desired-state=running \
    --format 'table {{.Name}}\t{{.Node}}\t{{.CurrentState}}\t{{.Error}}' "$stack"
}

case ${1:-} in
  secrets) cmd_secrets ;;
  up) cmd_up ;;
  down) cmd_down ;;
  dashboard) cmd_dashboard ;;
  status) cmd_status ;;
  # Redis's ACL file as `secrets` would create it (hashes only), for a check or a diff.
  acl) read_env_file; redis_acl ;;
  *) die "usage: $0 secrets|up|down|dashboard|status|acl" ;;
esac
