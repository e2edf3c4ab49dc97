#!/usr/bin/env bash
# The stack on Docker Swarm (compose/stack.yaml, docs/swarm.md), against the engine DOCKER_HOST
# names, which must be a swarm manager. The Makefile's swarm-* targets call this.
#
#   compose/scripts/swarm.sh images      build the images with the local engine, load them on
#                                        every node of SWARM_NODES (no registry needed)
#   compose/scripts/swarm.sh preflight   can every node do the IPsec encrypted overlays need?
#   compose/scripts/swarm.sh secrets     Docker secrets from the env file (existing ones kept)
#   compose/scripts/swarm.sh up          preflight, secrets, then docker stack deploy
#   compose/scripts/swarm.sh load        a one-off service on the stack's backend network that
#                                        sends a burst of tasks (QUEUE, COUNT, LOAD_ARGS)
#   compose/scripts/swarm.sh down        docker stack rm, wait until its services, tasks and
#                                        networks are gone, say what is left
#   compose/scripts/swarm.sh dashboard   a forwarder on the manager: 127.0.0.1:PORT -> the leader
#   compose/scripts/swarm.sh dashboard-stop   remove that forwarder
#   compose/scripts/swarm.sh status      services, their tasks, where they run, why not running
#   compose/scripts/swarm.sh acl         print the Redis ACL file the secret holds (hashes only)
#
# Settings (environment): SWARM_STACK (celery), ENV_FILE (.env), SWARM_DOCKER_GID (the socket's
# group on the managers: read off the manager's socket when unset), SWARM_RESOLVE_IMAGE (always
# when APP_IMAGE names a registry host, else never: images loaded on the nodes have no registry
# digest), SCALER_HTTP_PORT_HOST (the env file's; 9808 when unset), SWARM_REMOVE_SECRETS=1
# (down: also remove the stack's secrets), SWARM_WAIT_S (the workers' stop grace, 150, plus
# 30: a busy worker's task finishes before its network goes), SWARM_STACK_FILE
# (compose/stack.yaml), SWARM_UNENCRYPTED=1 (deploy the overlays without `encrypted`),
# SWARM_SKIP_PREFLIGHT=1, SWARM_NODES (space-separated Docker hosts, one per node, e.g.
# "ssh://root@node-1 ssh://root@node-2": `images` loads on them, `preflight` checks them; without
# it `preflight` checks the manager DOCKER_HOST names only), SWARM_BUILD=0 (`images`: ship the
# images as they are, no build), SWARM_LOAD_WAIT_S (600).
# Secrets go to `docker secret create` on stdin (printf is a shell builtin: no password on any
# command line) and nowhere else; .env's other variables are exported for the deploy (an exported
# variable of the same name wins, as with Compose).
set -euo pipefail

cd "$(dirname "$0")/../.."
stack=${SWARM_STACK:-celery}
env_file=${ENV_FILE:-.env}
stack_file=${SWARM_STACK_FILE:-compose/stack.yaml}
wait_s=${SWARM_WAIT_S:-$((${WORKER_STOP_GRACE_SECONDS:-150} + 30))}
app_image=${APP_IMAGE:-celery-stack/app:latest}
read -r -a nodes <<<"${SWARM_NODES:-}"
ENCRYPTED_OPT=$'    driver_opts:\n      encrypted: ""\n'
# Variables that hold a password (or a hash only Redis's ACL file needs): never exported.
secret_vars=(REDIS_WORKER_PASSWORD REDIS_SCALER_PASSWORD REDIS_ADMIN_PASSWORD POSTGRES_PASSWORD
  POSTGRES_APP_PASSWORD FLOWER_PASSWORD SCALER_TOKEN SCALER_GATE_TOKEN)

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
    "user default off ~* &* +@all" \
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
  gate_token=$(require SCALER_GATE_TOKEN)
  ((${#gate_token} >= 16)) || die "SCALER_GATE_TOKEN in $env_file: expected at least 16 characters (the gate refuses a shorter token)"
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
  # The engine gate's bearer token: the gate and the scalers read it from this one secret.
  create_secret gate_token "$gate_token"
}

# .env's non-secret variables into the environment (an exported one wins), for the deploy.
export_settings() {
  local name
  for name in "${!file_values[@]}"; do
    [[ " ${secret_vars[*]} " == *" $name "* || $name == *_SHA256 ]] && continue
    [[ -n ${!name-} ]] && continue
    export "$name=${file_values[$name]}"
  done
  app_image=${APP_IMAGE:-$app_image}
}

# The Docker socket's group on the manager DOCKER_HOST names (the engine gate runs in that group).
socket_gid() {
  if [[ -n ${SWARM_DOCKER_GID:-} ]]; then printf '%s' "$SWARM_DOCKER_GID"; return; fi
  docker run --rm --user 0 --network none -v /var/run/docker.sock:/var/run/docker.sock:ro \
    --entrypoint stat "$app_image" -c %g /var/run/docker.sock ||
    die "cannot read the Docker socket's group on the manager: set SWARM_DOCKER_GID"
}

# A registry host in the image name (registry.example:5000/..., localhost/...): the CLI can ask it
# for the digest. A plain repo[:tag] is a local or loaded image, or Docker Hub's.
names_registry() {
  local first=${1%%/*}
  [[ $1 == */* && ($first == *.* || $first == *:* || $first == localhost) ]]
}

# IPsec for encrypted overlays, on every node of SWARM_NODES (else the manager DOCKER_HOST names):
# compose/scripts/ipsec-probe.py in a container of the app image, in a network namespace of its
# own. Returns 1 when a node cannot (the message says what to do), 0 otherwise.
cmd_preflight() {
  local probe host out rc bad=0
  probe=$(<compose/scripts/ipsec-probe.py)
  local hosts=("${nodes[@]}")
  ((${#hosts[@]})) || hosts=("")
  for host in "${hosts[@]}"; do
    rc=0
    out=$(${host:+env DOCKER_HOST=$host} docker run --rm --network none --user 0 --cap-drop ALL \
      --cap-add NET_ADMIN --entrypoint python "$app_image" -c "$probe" 2>&1) || rc=$?
    case $rc in
      0) echo "swarm: preflight ${host:-manager}: $out" ;;
      3)
        bad=1
        echo "swarm: preflight ${host:-manager}: encrypted overlay networks cannot work there: $out" >&2 ;;
      4) echo "swarm: preflight ${host:-manager}: IPsec check inconclusive ($out); deploying anyway" >&2 ;;
      *) die "preflight ${host:-manager}: could not run the IPsec check in $app_image (exit $rc): $out
(the image must be on that node: make swarm-images; SWARM_SKIP_PREFLIGHT=1 skips the check)" ;;
    esac
  done
  if ((bad)); then
    echo "swarm: the stack's overlay networks are encrypted (IPsec between nodes). Either load the
  kernel's IPsec support on every node (xfrm_user, esp4, the AES-GCM crypto modules) and allow
  ESP (IP protocol 50) between the nodes, or deploy unencrypted overlays on a network you trust:
  SWARM_UNENCRYPTED=1 make swarm-up  (docs/swarm.md, \"Encrypted overlays\")" >&2
    return 1
  fi
}

# The stack file to deploy: compose/stack.yaml, or with SWARM_UNENCRYPTED=1 a copy without the
# overlays' `encrypted` option, written beside it (the policy config's path is relative to the
# file) and removed after the deploy.
unencrypted_copy() {
  local text copy
  text=$(<"$stack_file")$'\n'
  [[ $text == *"$ENCRYPTED_OPT"* ]] || die "SWARM_UNENCRYPTED=1: $stack_file has no encrypted network"
  copy="$(dirname "$stack_file")/.stack-unencrypted-$$.yaml"
  printf '%s' "${text//"$ENCRYPTED_OPT"/}" >"$copy"
  printf '%s' "$copy"
}

cmd_up() {
  read_env_file
  export_settings
  export SWARM_STACK=$stack APP_IMAGE=$app_image
  local deploy_file=$stack_file
  if [[ ${SWARM_UNENCRYPTED:-0} == 1 ]]; then
    deploy_file=$(unencrypted_copy)
    # shellcheck disable=SC2064  # expanded now: the variable is a local
    trap "rm -f '$deploy_file'" EXIT
    echo "swarm: SWARM_UNENCRYPTED=1: the overlay networks carry traffic between nodes unencrypted"
  elif [[ ${SWARM_SKIP_PREFLIGHT:-0} != 1 ]] && grep -q '^ *encrypted:' "$stack_file"; then
    cmd_preflight || exit 1
  fi
  cmd_secrets
  DOCKER_GID=$(socket_gid)
  export DOCKER_GID
  local policy=${SCALER_POLICY_FILE:-./scaler-policy.yaml}
  [[ $policy == /* ]] || policy=compose/${policy#./}
  [[ -r $policy ]] || die "SCALER_POLICY_FILE: cannot read $policy"
  SCALER_POLICY_SHA=$(sha256sum "$policy" | cut -c1-12)
  export SCALER_POLICY_SHA
  local resolve=${SWARM_RESOLVE_IMAGE:-}
  if [[ -z $resolve ]]; then if names_registry "$app_image"; then resolve=always; else resolve=never; fi; fi
  docker stack deploy --prune --resolve-image "$resolve" --compose-file "$deploy_file" "$stack"
  echo
  echo "swarm: stack $stack deployed. Watch it converge (a minute or so):"
  echo "  make swarm-status                    services, replicas, where each task runs, why not"
  echo "  make swarm-dashboard                 the scaler's dashboard on 127.0.0.1:${SCALER_HTTP_PORT_HOST:-9808} of the manager"
  echo "  make swarm-load QUEUE=io_intensive COUNT=500   send a burst of tasks"
}

# What of the stack the manager still lists: services, networks (gone only once every task on
# every node has stopped: the manager refuses to remove a network a task still uses), configs.
stack_left() {
  local f="label=com.docker.stack.namespace=$stack" kind
  for kind in service network config; do
    docker "$kind" ls -q --filter "$f" | sed "s/^/$kind /"
  done
}

cmd_down() {
  docker rm -f "${stack}-dashboard" >/dev/null 2>&1 || true
  local deadline=$((SECONDS + wait_s)) left out next_rm=0
  # `docker stack rm` removes the services, then the networks: those still in use by stopping
  # tasks ("network ... is in use", or "not found" when another removal won) make it exit 1.
  # Not fatal: it is run again every 5 s while anything is left, until SWARM_WAIT_S.
  while true; do
    left=$(stack_left) || left="(the manager did not answer: docker ${DOCKER_HOST:-(context)})"
    [[ -n $left ]] || break
    if ((SECONDS >= next_rm)); then
      out=$(docker stack rm "$stack" 2>&1) || echo "swarm: docker stack rm: ${out//$'\n'/; } (waiting, retried)" >&2
      next_rm=$((SECONDS + 5))
    fi
    if ((SECONDS >= deadline)); then
      echo "swarm: stack $stack not gone after ${wait_s}s (SWARM_WAIT_S); still there:" >&2
      sed 's/^/  /' <<<"$left" >&2
      exit 1
    fi
    sleep 1
  done
  echo "swarm: stack $stack removed: no service, task, network or config of it is left"
  if [[ ${SWARM_REMOVE_SECRETS:-0} == 1 ]]; then
    local ids
    ids=$(docker secret ls -q --filter "label=celery-stack.swarm=$stack")
    # shellcheck disable=SC2086  # ids: one word each
    [[ -z $ids ]] || docker secret rm $ids >/dev/null
    echo "swarm: the stack's secrets removed"
  else
    echo "swarm: kept: $(docker secret ls -q --filter "label=celery-stack.swarm=$stack" | wc -l) secrets" \
      "(SWARM_REMOVE_SECRETS=1 make swarm-down removes them)"
  fi
  local volumes
  volumes=$(docker volume ls -q --filter "label=com.docker.stack.namespace=$stack" | tr '\n' ' ')
  echo "swarm: kept: the volumes on the nodes (data: Redis, PostgreSQL, beat on the celery.data" \
    "node; each scaler's recording on its own); on this manager: ${volumes:-none}"
}

# A forwarder (compose/scripts/dashboard-forward.py) in a container of the app image, started with
# plain `docker run` (which, unlike a Swarm service, can bind to the manager's loopback), on the
# attachable `ops` network: it forwards to whichever scaler /status reports as the leader, else
# to either one.
cmd_dashboard() {
  read_env_file
  export_settings
  local port=${SCALER_HTTP_PORT_HOST:-9808} script
  script=$(<compose/scripts/dashboard-forward.py)
  docker rm -f "${stack}-dashboard" >/dev/null 2>&1 || true
  docker run -d --rm --init --name "${stack}-dashboard" --network "${stack}_ops" \
    -p "127.0.0.1:$port:9100" --read-only --tmpfs /tmp:size=1m --cap-drop ALL \
    --security-opt no-new-privileges --user 10001:10001 -e "SCALERS=${stack}_scaler" \
    --entrypoint python "$app_image" -c "$script" >/dev/null
  echo "swarm: the scaler's dashboard: http://127.0.0.1:$port/ on the manager (stop it: make swarm-dashboard-stop)"
}

cmd_dashboard_stop() {
  if docker rm -f "${stack}-dashboard" >/dev/null 2>&1; then
    echo "swarm: dashboard forwarder ${stack}-dashboard removed"
  else
    echo "swarm: no dashboard forwarder ${stack}-dashboard"
  fi
}

cmd_status() {
  docker stack services "$stack"
  echo
  docker stack ps --filter desired-state=running \
    --format 'table {{.Name}}\t{{.Node}}\t{{.CurrentState}}\t{{.Error}}' "$stack"
  # Tasks meant to run that do not: Swarm's own error when it has one; a task "Starting" with
  # none waits for its health check (workers wait for PostgreSQL: wait_migrated), which is where
  # overlays that cannot carry traffic between nodes show.
  local waiting
  waiting=$(docker stack ps --filter desired-state=running --format '{{.Name}} {{.CurrentState}}' \
    "$stack" | grep -v ' Running ' || true)
  [[ -n $waiting ]] || return 0
  echo
  echo "swarm: $(wc -l <<<"$waiting") task(s) meant to run are not running yet:"
  docker stack ps --no-trunc --filter desired-state=running \
    --format '  {{.Name}} on {{.Node}}: {{.CurrentState}} {{.Error}}' "$stack" | grep -v ' Running ' || true
  local net encrypted=""
  for net in $(docker network ls -q --filter "label=com.docker.stack.namespace=$stack"); do
    [[ $(docker network inspect -f '{{index .Options "encrypted"}}' "$net" 2>/dev/null) == "<no value>" ]] ||
      encrypted=1
  done
  if [[ -n $encrypted ]]; then
    echo "swarm: the stack's overlays are encrypted; checking IPsec on the nodes:"
    cmd_preflight || true
  else
    echo "swarm: tasks in Starting wait for their health check (workers: for PostgreSQL and the" \
      "schema); an Error above says why Swarm cannot start one (e.g. No such image: make swarm-images)"
  fi
}

# The images without a registry: built with the local engine (DOCKER_HOST is the manager's, so
# it is set aside for the build), then `docker save` once and `docker load` on every node of
# SWARM_NODES at once, with the Redis and PostgreSQL images the stack names.
cmd_images() {
  read_env_file
  export_settings
  ((${#nodes[@]})) || die "images: set SWARM_NODES to one Docker host per node (ssh://user@node-1 ...)"
  local redis=${REDIS_IMAGE:-redis:7-alpine} postgres=${POSTGRES_IMAGE:-postgres:16-alpine}
  local python=${PYTHON_IMAGE:-python:3.12-slim} local_host=${SWARM_BUILD_HOST:-}
  local -a local_docker=(env -u DOCKER_HOST -u DOCKER_CONTEXT ${local_host:+DOCKER_HOST=$local_host} docker)
  if [[ ${SWARM_BUILD:-1} == 1 ]]; then
    echo "swarm: building $app_image with the local engine (PYTHON_IMAGE=$python)"
    "${local_docker[@]}" build -q --build-arg "PYTHON_IMAGE=$python" -t "$app_image" \
      -f compose/app.Dockerfile . >/dev/null
  fi
  local image
  for image in "$app_image" "$redis" "$postgres"; do
    "${local_docker[@]}" image inspect "$image" >/dev/null 2>&1 ||
      die "images: $image is not on the local engine (pull or build it there first)"
  done
  local tar pids=() host i failed=0
  tar=$(mktemp "${TMPDIR:-/tmp}/celery-stack-images.XXXXXX.tar")
  # shellcheck disable=SC2064  # expanded now: the variable is a local
  trap "rm -f '$tar'" EXIT
  "${local_docker[@]}" save -o "$tar" "$app_image" "$redis" "$postgres"
  echo "swarm: loading $(du -h "$tar" | cut -f1) of images on ${#nodes[@]} node(s)"
  for host in "${nodes[@]}"; do
    env DOCKER_HOST="$host" docker load -q -i "$tar" >/dev/null &
    pids+=($!)
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}" || { echo "swarm: docker load on ${nodes[$i]} failed" >&2; failed=1; }
  done
  ((failed == 0)) || exit 1
  echo "swarm: $app_image $redis $postgres on every node of SWARM_NODES"
  names_registry "$app_image" ||
    echo "swarm: deploy with the same APP_IMAGE; swarm-up does not ask a registry for it"
}

# A burst of tasks from a one-off service on the stack's backend network (Redis is not published),
# as the worker user with the workers' secrets; its output, then it is removed. QUEUE="io_intensive
# cpu_intensive" (or all), COUNT, LOAD_ARGS (services.load's other options, e.g. "--duration 1").
cmd_load() {
  read_env_file
  export_settings
  local name="${stack}_load-$$" queue args=() state="" deadline=$((SECONDS + ${SWARM_LOAD_WAIT_S:-600}))
  for queue in ${QUEUE:-io_intensive}; do args+=(--queue "$queue"); done
  # shellcheck disable=SC2206  # LOAD_ARGS: options, split on blanks
  args+=(--count "${COUNT:-200}" ${LOAD_ARGS:-})
  local src dst secrets=()
  for src in broker_url_worker:broker_url result_backend_worker:result_backend database_url_app:database_url; do
    dst=${src#*:} src=${src%%:*}
    secrets+=(--secret "source=${stack}_$src,target=$dst,uid=10001,gid=10001,mode=0400")
  done
  docker service create --detach --quiet --name "$name" --network "${stack}_backend" \
    --restart-condition none --user 10001:10001 --label "celery-stack.swarm=$stack" "${secrets[@]}" \
    -e CELERY_BROKER_URL_FILE=/run/secrets/broker_url \
    -e CELERY_RESULT_BACKEND_FILE=/run/secrets/result_backend \
    -e DATABASE_URL_FILE=/run/secrets/database_url \
    "$app_image" python -m services.load "${args[@]}" >/dev/null
  # shellcheck disable=SC2064  # expanded now: the variable is a local
  trap "docker service rm '$name' >/dev/null 2>&1 || true" EXIT
  echo "swarm: $name sends: ${args[*]}"
  while ((SECONDS < deadline)); do
    state=$(docker service ps -q --no-trunc "$name" | head -1 | xargs -r docker inspect -f '{{.Status.State}}' 2>/dev/null || true)
    [[ $state =~ ^(complete|failed|rejected|shutdown|orphaned)$ ]] && break
    sleep 1
  done
  docker service logs --raw "$name" 2>/dev/null || true
  [[ -n $state ]] || state="unfinished after ${SWARM_LOAD_WAIT_S:-600}s (SWARM_LOAD_WAIT_S)"
  [[ $state == complete ]] ||
    die "load: $name $state: $(docker service ps --no-trunc --format '{{.Error}}' "$name" | head -1)"
  echo "swarm: load sent"
}

case ${1:-} in
  secrets) cmd_secrets ;;
  up) cmd_up ;;
  down) cmd_down ;;
  images) cmd_images ;;
  preflight) read_env_file; export_settings; cmd_preflight ;;
  load) cmd_load ;;
  dashboard) cmd_dashboard ;;
  dashboard-stop) cmd_dashboard_stop ;;
  status) cmd_status ;;
  # Redis's ACL file as `secrets` would create it (hashes only), for a check or a diff.
  acl) read_env_file; redis_acl ;;
  *) die "usage: $0 images|preflight|secrets|up|load|down|dashboard|dashboard-stop|status|acl" ;;
esac
