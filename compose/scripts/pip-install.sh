#!/bin/sh
# Used by compose/app.Dockerfile: pip install from the host-built wheelhouse (/wheels) when it
# holds wheels, so the build needs no network; from the index when there is none, or when its
# wheels do not fit this image's interpreter (a user's machine with network and another Python).
set -eu
if ls /wheels/*.whl >/dev/null 2>&1; then
  pip install --no-index --find-links /wheels "$@" && exit 0
  echo "pip-install: the wheelhouse does not cover this interpreter; trying the index" >&2
  exec pip install --find-links /wheels "$@"
fi
echo "pip-install: no wheelhouse (make wheels); installing from the index" >&2
exec pip install "$@"
