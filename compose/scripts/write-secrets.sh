#!/usr/bin/env bash
# Writes the Compose stack's secret files from the env file, one value per file, into a directory
# that compose/compose.yaml's top-level `secrets:` names (${SECRETS_DIR}/<name>). Compose
# bind-mounts each file read-only at /run/secrets/<target> of the services that list it, and the
# services read them as X_FILE (services/config.py, the scaler, the gate, Flower, PostgreSQL), so
# no password is in any container's environment, command or labels (`docker inspect`).
#   compose/scripts/write-secrets.sh ENV_FILE DIR     write (or refresh) DIR's files
#   compose/scripts/write-secrets.sh --digest DIR     print a short digest of DIR's files
#
# The env file stays the one source of truth: `make up` runs this after check-env.sh, so a
# password changed in the env file reaches the files. The digest goes into the services'
# environment (SECRETS_DIGEST, not a secret: 16 hex digits of a SHA-256 over 128-bit random
# values), so that a changed file makes Compose recreate the containers that read it (a bind
# mount of a file keeps the old one in a running container).
#
# Permissions (docs/security.md, "Secrets on Compose"): DIR is 0700, owned by whoever runs this,
# so no other user of the host can reach a file in it. The files are 0444: Compose v2 bind-mounts
# a file secret as it is on the host (it ignores `uid`, `gid` and `mode` for them) and the
# containers' user (uid 10001) must read its own; each container gets only the files it lists.
# An exported variable wins over the env file's, as it does for Compose (check-env.sh too).
set -euo pipefail

sha256_hex() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi | cut -c1-64; }

if [[ ${1:-} == --digest ]]; then
  dir=${2:?usage: write-secrets.sh --digest DIR}
  shopt -s nullglob
  files=("$dir"/*)
  ((${#files[@]})) || { echo "write-secrets: no secret files in $dir (make up writes them)" >&2; exit 1; }
  # Name and content of each file, in name order: a renamed or changed file changes it.
  for f in "${files[@]}"; do printf '%s\0' "${f##*/}"; cat "$f"; printf '\0'; done | sha256_hex | cut -c1-16
  exit 0
fi

env_file=${1:?usage: write-secrets.sh ENV_FILE DIR}
dir=${2:?usage: write-secrets.sh ENV_FILE DIR}
[[ -r $env_file ]] || { echo "write-secrets: cannot read $env_file (make up creates it)" >&2; exit 1; }

declare -A file_values=()
while IFS= read -r line || [[ -n $line ]]; do
  [[ $line =~ ^[[:space:]]*(#|$) ]] && continue
  [[ $line =~ ^[[:space:]]*(export[[:space:]]+)?([A-Za-z_][A-Za-z0-9_]*)=(.*)$ ]] || continue
  name=${BASH_REMATCH[2]} value=${BASH_REMATCH[3]}
  if [[ $value =~ ^\"(.*)\"$ || $value =~ ^\'(.*)\'$ ]]; then value=${BASH_REMATCH[1]}; fi
  file_values[$name]=$value
done <"$env_file"
value_of() {
  if [[ -n ${!1+set} ]]; then printf '%s' "${!1}"; else printf '%s' "${file_values[$1]-}"; fi
}
required() {
  local v
  v=$(value_of "$1")
  [[ -n $v ]] || { echo "write-secrets: $env_file: $1 is missing or empty (check-env.sh names what is expected)" >&2; exit 1; }
  printf '%s' "$v"
}

worker=$(required REDIS_WORKER_PASSWORD)
scaler=$(required REDIS_SCALER_PASSWORD)
owner_password=$(required POSTGRES_PASSWORD)
app_password=$(required POSTGRES_APP_PASSWORD)
flower_user=$(required FLOWER_USER)
flower_password=$(required FLOWER_PASSWORD)
gate_token=$(required SCALER_GATE_TOKEN)
scaler_token=$(value_of SCALER_TOKEN)  # may be empty: control disabled (compose.yaml)
owner=$(value_of POSTGRES_USER) db=$(value_of POSTGRES_DB) app_user=$(value_of POSTGRES_APP_USER)
owner=${owner:-celery} db=${db:-celery} app_user=${app_user:-celery_app}

declare -A secrets=(
  # Redis's `worker` user: workers, beat, Flower, migrate. Its `scaler` user: the scalers.
  [broker_url_worker]="redis://worker:${worker}@redis:6379/0"
  [result_backend_worker]="redis://worker:${worker}@redis:6379/1"
  [broker_url_scaler]="redis://scaler:${scaler}@redis:6379/0"
  [result_backend_scaler]="redis://scaler:${scaler}@redis:6379/1"
  # The tasks' role (workers, beat, Flower); the owner's (migrate only).
  [database_url_app]="postgresql://${app_user}:${app_password}@postgres:5432/${db}"
  [database_url_owner]="postgresql://${owner}:${owner_password}@postgres:5432/${db}"
  [postgres_password]=$owner_password
  [postgres_app_password]=$app_password
  [scaler_token]=$scaler_token
  [gate_token]=$gate_token
  [flower_basic_auth]="${flower_user}:${flower_password}"
)

umask 077
mkdir -p "$dir"
chmod 700 "$dir"
written=()
for name in "${!secrets[@]}"; do
  target=$dir/$name
  if [[ -f $target && $(cat "$target") == "${secrets[$name]}" ]]; then
    chmod 444 "$target"
    continue
  fi
  tmp=$(mktemp "$dir/.$name.XXXXXX")
  printf '%s' "${secrets[$name]}" >"$tmp"
  chmod 444 "$tmp"
  mv -f "$tmp" "$target"
  written+=("$name")
done
if ((${#written[@]})); then
  echo "write-secrets: wrote $dir: ${written[*]}"
fi
