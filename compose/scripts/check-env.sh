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
for name in POSTGRES_PASSWORD POSTGRES_APP_PASSWORD FLOWER_PASSWORD SCALER_GATE_TOKEN; do
  v=$(value_of "$name")
  if [[ -z $v ]]; then
    fail "$name is missing or empty: expected a generated secret (make up appends one when the line is absent; an empty value must be set by hand, and POSTGRES_PASSWORD must stay what the database volume was created with)"
  elif [[ ! $v =~ $secret_re ]]; then
    fail "$name is malformed: expected at least 16 URL-safe characters (A-Z a-z 0-9 . _ ~ -)"
  fi
done
# Redis's ACL users: each password, and the SHA-256 of it that is all Redis is given. Nothing is
# stored under these passwords, so a missing one can simply be generated (an upgrade from a .env
# that had only REDIS_PASSWORD).
sha256_hex() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi | cut -c1-64; }
for name in REDIS_WORKER_PASSWORD REDIS_SCALER_PASSWORD REDIS_ADMIN_PASSWORD; do
  v=$(value_of "$name") h=$(value_of "${name}_SHA256")
  if [[ -z $v ]]; then
    fail "$name is missing or empty: expected a generated secret (make up appends it and its hash when the line is absent; or add one: $name=\$(od -An -N16 -tx1 /dev/urandom | tr -d ' \\n'), and ${name}_SHA256 of it)"
  elif [[ ! $v =~ $secret_re ]]; then
    fail "$name is malformed: expected at least 16 URL-safe characters (A-Z a-z 0-9 . _ ~ -)"
  elif [[ -z $h ]]; then
    fail "${name}_SHA256 is missing or empty: expected the SHA-256 of $name (printf %s \"\$$name\" | sha256sum)"
  elif [[ $h != "$(printf '%s' "$v" | sha256_hex)" ]]; then
    fail "${name}_SHA256 does not match $name: expected its SHA-256 as 64 lowercase hex digits (printf %s \"\$$name\" | sha256sum)"
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

for name in POSTGRES_USER POSTGRES_DB POSTGRES_APP_USER; do
  v=$(value_of "$name")
  if [[ -n $v && ! $v =~ ^[A-Za-z_][A-Za-z0-9_]{0,62}$ ]]; then
    fail "$name='$v' is malformed: expected a PostgreSQL identifier (letters, digits, '_'; at most 63)"
  fi
done
# The tasks' role must not be the owner: it exists to hold less than the owner does.
owner=$(value_of POSTGRES_USER) app_user=$(value_of POSTGRES_APP_USER)
if [[ ${app_user:-celery_app} == "${owner:-celery}" ]]; then
  fail "POSTGRES_APP_USER='${app_user:-celery_app}' equals POSTGRES_USER: expected a role of its own for the tasks (default celery_app)"
fi

v=$(value_of CELERY_KEY_PREFIX)
if [[ -n $v && ! $v =~ ^[A-Za-z0-9:._-]+$ ]]; then
  fail "CELERY_KEY_PREFIX='$v' is malformed: expected letters, digits, ':', '.', '_' or '-'"
fi

# redis-server's maxmemory: bytes, or a number with k/kb/m/mb/g/gb (k = 1000, kb = 1024); at
# least 16mb, or Redis refuses every write from the start.
v=$(value_of REDIS_MAXMEMORY)
v=${v:-384mb}
if [[ ! ${v,,} =~ ^([1-9][0-9]{0,12})(b|k|kb|m|mb|g|gb)?$ ]]; then
  fail "REDIS_MAXMEMORY='$v' is malformed: expected a size such as 384mb or 1gb (b, k, kb, m, mb, g, gb)"
else
  declare -A unit_bytes=([b]=1 [k]=1000 [kb]=1024 [m]=1000000 [mb]=1048576 [g]=1000000000 [gb]=1073741824)
  if (( BASH_REMATCH[1] * unit_bytes[${BASH_REMATCH[2]:-b}] < 16 * 1048576 )); then
    fail "REDIS_MAXMEMORY='$v' is too small: expected at least 16mb"
  fi
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
if [[ -n ${num[POSTGRES_MAX_CONNECTIONS]-} ]] && (( num[POSTGRES_MAX_CONNECTIONS] > 999 )); then
  fail "POSTGRES_MAX_CONNECTIONS='${num[POSTGRES_MAX_CONNECTIONS]}' is out of range: expected 1-999 (one process each, under postgres's pids limit of 1024 in compose.yaml)"
fi
if [[ -n ${num[SCALER_LEASE_S]-} ]] && (( num[SCALER_LEASE_S] > 600 )); then
  fail "SCALER_LEASE_S='${num[SCALER_LEASE_S]}' is out of range: expected 1-600 seconds"
fi
# The Docker socket's group, for the engine gate (`make up` exports it from the socket): 0 is valid.
v=$(value_of DOCKER_GID)
if [[ -n $v && ! $v =~ ^[0-9]{1,9}$ ]]; then
  fail "DOCKER_GID='$v' is malformed: expected a numeric group id (stat -c %g /var/run/docker.sock)"
fi
v=$(value_of STACK_PROD)
if [[ -n $v && $v != 0 && $v != 1 ]]; then
  fail "STACK_PROD='$v' is malformed: expected 1 (make adds compose.prod.yaml), 0 or empty (make up PROD=1 / PROD=0 set it)"
fi
v=$(value_of GATE_ALLOWED_BIND_MOUNTS)
IFS=, read -ra mounts <<<"$v"
for m in ${mounts[@]+"${mounts[@]}"}; do
  m=${m#"${m%%[![:space:]]*}"} m=${m%"${m##*[![:space:]]}"}
  [[ -z $m ]] && continue
  if [[ $m != /* || $m =~ (^|/)\.\.?(/|$) || $m =~ ^/+$ ]]; then
    fail "GATE_ALLOWED_BIND_MOUNTS has '$m': expected absolute host paths other than / (no . or .. segment), comma-separated"
  fi
done

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
