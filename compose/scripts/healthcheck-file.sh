#!/usr/bin/env bash
# Healthy when FILE exists and was modified at most MAX_AGE seconds ago. The worker touches its
# heartbeat file while its consumer runs; reading an mtime costs nothing, unlike `celery inspect
# ping` (a Python start and a broker round trip per probe, per replica).
#   healthcheck-file.sh FILE MAX_AGE
set -euo pipefail

file=${1:?usage: healthcheck-file.sh FILE MAX_AGE}
max_age=${2:?usage: healthcheck-file.sh FILE MAX_AGE}
[[ -e $file ]] || { echo "no heartbeat file $file yet"; exit 1; }
age=$(( $(date +%s) - $(stat -c %Y "$file") ))
if (( age > max_age )); then
  echo "heartbeat $file is ${age}s old (max ${max_age}s)"
  exit 1
fi
