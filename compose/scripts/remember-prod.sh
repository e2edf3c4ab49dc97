#!/usr/bin/env bash
# Remembers `make up PROD=1` in the env file as STACK_PROD=1 (and `PROD=0` as STACK_PROD=), so a
# later `make up` without PROD keeps compose.prod.yaml's limits instead of silently dropping them.
# Only that one line changes; the file keeps its mode (0600: it holds the secrets).
#   compose/scripts/remember-prod.sh ENV_FILE 1|0
set -euo pipefail

env_file=${1:?usage: remember-prod.sh ENV_FILE 1|0}
value=${2:?usage: remember-prod.sh ENV_FILE 1|0}
[[ $value == 0 || $value == 1 ]] || { echo "remember-prod: expected 1 or 0, got '$value'" >&2; exit 2; }
[[ -w $env_file ]] || { echo "remember-prod: cannot write $env_file" >&2; exit 1; }

current=$(sed -n 's/^STACK_PROD=//p' "$env_file" | tail -n 1)
[[ $current == 1 ]] && was=1 || was=0
if [[ $was == "$value" ]]; then
  exit 0
fi
tmp=$(mktemp "${env_file}.XXXXXX")
trap 'rm -f "$tmp"' EXIT
chmod --reference="$env_file" "$tmp" 2>/dev/null || chmod 600 "$tmp"
# In place when the line is there (.env.example has it, empty), else appended.
new=$([[ $value == 1 ]] && echo 1 || true)
sed "s/^STACK_PROD=.*/STACK_PROD=$new/" "$env_file" >"$tmp"
if [[ $value == 1 ]] && ! grep -q '^STACK_PROD=' "$tmp"; then printf 'STACK_PROD=1\n' >>"$tmp"; fi
if [[ $value == 1 ]]; then
  msg="recorded STACK_PROD=1: later make up/down/ps keep compose/compose.prod.yaml (PROD=0 forgets it)"
else
  msg="cleared STACK_PROD: compose/compose.prod.yaml's limits are off until make up PROD=1"
fi
mv "$tmp" "$env_file"
trap - EXIT
echo "remember-prod: $env_file: $msg"
