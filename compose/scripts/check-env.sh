#!/usr/bin/env bash
# Validates the stack's settings before Compose sees them, so that a missing or malformed value
# stops `make up` with a message naming the variable, the value and what was expected (instead of
# a broker URL that fails to parse minutes later inside a container). Reads the env file; an
# exported variable of the same name wins, as it does for Compose. Reports every problem at once.
#   compose/scripts/check-env.sh [ENV_FILE]            (default: .env)
set -euo pipefail

env_file=${1:-.env}
if [[ ! -r $env_file ]]; then
  echo "check-env: $env_file not found; run compose/scripts/init-env.sh (make up does)" >&2
  exit 1
fi

declare -A file_values=()
while IFS= read -r line || [[ -n $line ]]; do
  [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
  if [[ ! $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]]; then
    echo "check-env: $env_file: cannot parse line: $line" >&2
    exit 1
  fi
  name=${BASH_REMATCH[2]} value=${BASH_REMATCH[3]}
  # Surrounding quotes are syntax, as in Compose's env files.
  if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
  file_values[$name]=$value
done <"$env_file"

errors=()
# The effective value: the exported variable when set, else the file's.
value_of() {
  if [[ -n ${!1+set} ]]; then printf '%s' "${!1}"; else printf '%s' "${file_values[$1]-}"; fi
}
fail() { errors+=("$1"); }

secret_re='^[A-Za-z0-9._~-]{16,}$'
for name in REDIS_PASSWORD POSTGRES_PASSWORD FLOWER_PASSWORD; do
  v=$(value_of "$name")
  if [[ -z $v ]]; then
    fail "$name is missing or empty: expected a generated secret (delete $env_file and run make up to generate one)"
  elif [[ ! $v =~ $secret_re ]]; then
    fail "$name is malformed: expected at least 16 URL-safe characters (A-Z a-z 0-9 . _ ~ -)"
  fi
done
v=$(value_of SCALER_TOKEN)
if [[ -n $v && ! $v =~ $secret_re ]]; then
  fail "SCALER_TOKEN is malformed: expected at least 16 URL-safe characters (A-Z a-z 0-9 . _ ~ -)"
fi

v=$(value_of FLOWER_USER)
if [[ -z $v ]]; then
  fail "FLOWER_USER is missing or empty: expected a user name for Flower's basic auth"
elif [[ ! $v =~ ^[A-Za-z0-9._-]+$ ]]; then
  fail "FLOWER_USER='$v' is malformed: expected letters, digits, '.', '_' or '-' (no ':')"
fi

for name in POSTGRES_USER POSTGRES_DB; do
  v=$(value_of "$name")
  if [[ -n $v && ! $v =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
    fail "$name='$v' is malformed: expected a PostgreSQL identifier (letters, digits, '_')"
  fi
done

v=$(value_of CELERY_KEY_PREFIX)
if [[ -n $v && ! $v =~ ^[A-Za-z0-9:._-]+$ ]]; then
  fail "CELERY_KEY_PREFIX='$v' is malformed: expected letters, digits, ':', '.', '_' or '-'"
fi

v=$(value_of LOG_LEVEL)
case "${v:-INFO}" in
  DEBUG | INFO | WARNING | ERROR | CRITICAL) ;;
  *) fail "LOG_LEVEL='$v' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL" ;;
esac

# Positive integers; an unset or empty one takes the compose file's default.
declare -A defaults=(
  [CELERY_VISIBILITY_TIMEOUT]=3600 [CELERY_TASK_TIME_LIMIT]=120 [CELERY_TASK_SOFT_TIME_LIMIT]=100
  [HEALTH_CHECK_INTERVAL]=300 [WORKER_STOP_GRACE_SECONDS]=150 [DB_POOL_MIN]=1 [DB_POOL_MAX]=4 [IO_DB_POOL_MAX]=8
  [DEFAULT_CONCURRENCY]=2 [CPU_CONCURRENCY]="" [IO_CONCURRENCY]=32 [PRIORITY_CONCURRENCY]=2
  [SCHEDULED_CONCURRENCY]=1 [FLOWER_HOST_PORT]=5555 [SCALER_HTTP_PORT_HOST]=9808
  [SCALER_STANDBY_HTTP_PORT_HOST]=9809 [SCALER_LEASE_S]=15 [POSTGRES_MAX_CONNECTIONS]=300
)
declare -A num=()
for name in "${!defaults[@]}"; do
  v=$(value_of "$name")
  v=${v:-${defaults[$name]}}
  [[ -z $v ]] && continue
  if [[ ! $v =~ ^[1-9][0-9]{0,8}$ ]]; then
    fail "$name='$v' is malformed: expected a positive integer"
  else
    num[$name]=$v
  fi
done
for name in FLOWER_HOST_PORT SCALER_HTTP_PORT_HOST SCALER_STANDBY_HTTP_PORT_HOST; do
  if [[ -n ${num[$name]-} ]] && (( num[$name] > 65535 )); then
    fail "$name='${num[$name]}' is not a TCP port: expected 1-65535"
  fi
done
if [[ -n ${num[SCALER_LEASE_S]-} ]] && (( num[SCALER_LEASE_S] > 600 )); then
  fail "SCALER_LEASE_S='${num[SCALER_LEASE_S]}' is out of range: expected 1-600 seconds"
fi
# The Docker socket's group, for the scaler (`make up` exports it from the socket): 0 is valid.
v=$(value_of DOCKER_GID)
if [[ -n $v && ! $v =~ ^[0-9]{1,9}$ ]]; then
  fail "DOCKER_GID='$v' is malformed: expected a numeric group id (stat -c %g /var/run/docker.sock)"
fi

# The windows must nest, or a running task is killed or delivered twice:
# soft limit < hard limit < stop grace period < Redis visibility timeout.
ordered() {
  local a=$1 b=$2
  [[ -n ${num[$a]-} && -n ${num[$b]-} ]] || return 0
  if (( num[$a] >= num[$b] )); then
    fail "$a=${num[$a]} must be less than $b=${num[$b]} ($3)"
  fi
}
ordered CELERY_TASK_SOFT_TIME_LIMIT CELERY_TASK_TIME_LIMIT "the soft limit warns before the hard one kills"
ordered CELERY_TASK_TIME_LIMIT WORKER_STOP_GRACE_SECONDS "a warm shutdown must let the longest task finish"
ordered WORKER_STOP_GRACE_SECONDS CELERY_VISIBILITY_TIMEOUT "a task still running must not be redelivered"
if [[ -n ${num[DB_POOL_MIN]-} && -n ${num[DB_POOL_MAX]-} ]] && (( num[DB_POOL_MIN] > num[DB_POOL_MAX] )); then
  fail "DB_POOL_MIN=${num[DB_POOL_MIN]} must not exceed DB_POOL_MAX=${num[DB_POOL_MAX]}"
fi

if (( ${#errors[@]} )); then
  for e in "${errors[@]}"; do echo "check-env: $env_file: $e" >&2; done
  exit 1
fi
echo "check-env: $env_file is valid"
