#!/usr/bin/env bash
# Creates an env file from .env.example with freshly generated secrets, so that no stack ever
# runs with a default password. When the file exists, its values are never changed (secrets
# already in use by the volumes must not change under them): only a secret it lacks (added by a
# newer version of the stack) is appended, freshly generated, with its hash where Redis needs one.
#   compose/scripts/init-env.sh [EXAMPLE] [TARGET]     (defaults: .env.example .env)
set -euo pipefail

example=${1:-.env.example}
target=${2:-.env}
secrets=(REDIS_WORKER_PASSWORD REDIS_SCALER_PASSWORD REDIS_ADMIN_PASSWORD POSTGRES_PASSWORD POSTGRES_APP_PASSWORD FLOWER_PASSWORD SCALER_TOKEN SCALER_GATE_TOKEN)

# 32 hex characters (128 bits) from the kernel's CSPRNG: URL-safe, so it can sit in a URL as is.
new_secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }
sha256_hex() { if command -v sha256sum >/dev/null; then sha256sum; else shasum -a 256; fi | cut -c1-64; }
hashed=(REDIS_WORKER_PASSWORD REDIS_SCALER_PASSWORD REDIS_ADMIN_PASSWORD)

if [[ -e $target ]]; then
  added=()
  for name in "${secrets[@]}"; do
    grep -q "^${name}=" "$target" && continue
    value=$(new_secret)
    printf '%s=%s\n' "$name" "$value" >>"$target"
    added+=("$name")
    if [[ " ${hashed[*]} " == *" $name "* ]] && ! grep -q "^${name}_SHA256=" "$target"; then
      printf '%s_SHA256=%s\n' "$name" "$(printf '%s' "$value" | sha256_hex)" >>"$target"
    fi
  done
  if ((${#added[@]})); then
    echo "init-env: $target exists; appended the secrets it lacked: ${added[*]} (nothing else changed)"
  else
    echo "init-env: $target exists; left as it is"
  fi
  exit 0
fi
[[ -r $example ]] || { echo "init-env: cannot read $example" >&2; exit 1; }

tmp=$(mktemp "${target}.XXXXXX")
trap 'rm -f "$tmp"' EXIT
cp "$example" "$tmp"
for name in "${secrets[@]}"; do
  grep -q "^${name}=" "$tmp" || { echo "init-env: $example has no ${name}= line" >&2; exit 1; }
  sed -i "s/^${name}=.*/${name}=$(new_secret)/" "$tmp"
done
# Redis is given only the SHA-256 of its users' passwords (compose.yaml): derived here, once.
for name in "${hashed[@]}"; do
  grep -q "^${name}_SHA256=" "$tmp" || { echo "init-env: $example has no ${name}_SHA256= line" >&2; exit 1; }
  hash=$(grep "^${name}=" "$tmp" | cut -d= -f2- | tr -d '\n' | sha256_hex)
  sed -i "s/^${name}_SHA256=.*/${name}_SHA256=${hash}/" "$tmp"
done
chmod 600 "$tmp"
mv "$tmp" "$target"
trap - EXIT
echo "init-env: created $target with new secrets (${secrets[*]})"
