#!/usr/bin/env bash
# Creates an env file from .env.example with freshly generated secrets, so that no stack ever
# runs with a default password. Does nothing when the file exists (secrets already in use by the
# volumes must not change under them).
#   compose/scripts/init-env.sh [EXAMPLE] [TARGET]     (defaults: .env.example .env)
set -euo pipefail

example=${1:-.env.example}
target=${2:-.env}
secrets=(REDIS_PASSWORD POSTGRES_PASSWORD FLOWER_PASSWORD SCALER_TOKEN)

if [[ -e $target ]]; then
  echo "init-env: $target exists; left as it is"
  exit 0
fi
[[ -r $example ]] || { echo "init-env: cannot read $example" >&2; exit 1; }

# 32 hex characters (128 bits) from the kernel's CSPRNG: URL-safe, so it can sit in a URL as is.
new_secret() { od -An -N16 -tx1 /dev/urandom | tr -d ' \n'; }

tmp=$(mktemp "${target}.XXXXXX")
trap 'rm -f "$tmp"' EXIT
cp "$example" "$tmp"
for name in "${secrets[@]}"; do
  grep -q "^${name}=" "$tmp" || { echo "init-env: $example has no ${name}= line" >&2; exit 1; }
  sed -i "s/^${name}=.*/${name}=$(new_secret)/" "$tmp"
done
chmod 600 "$tmp"
mv "$tmp" "$target"
trap - EXIT
echo "init-env: created $target with new secrets (${secrets[*]})"
