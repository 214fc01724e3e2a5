#!/usr/bin/env bash
# Creates the unprivileged system user Weir's worker processes run as when the
# executor-manager runs as root (setting WEIR_WORKER_USER, default weir-worker): no home, no
# login shell, a group of its own. Idempotent; as a non-root user it does nothing, because
# then the workers simply run as that user.
#   worker-user.sh
set -euo pipefail
USER_NAME=${WEIR_WORKER_USER:-weir-worker}

if [[ $(id -u) -ne 0 ]]; then
  echo "worker-user: not root, nothing to do (workers run as $(id -un))"
  exit 0
fi
if getent passwd "$USER_NAME" >/dev/null; then
  echo "worker-user: $USER_NAME exists (uid $(id -u "$USER_NAME"))"
  exit 0
fi
NOLOGIN=$(command -v nologin || echo /usr/sbin/nologin)
# --system: a uid below 1000, no ageing; /nonexistent like `nobody`, so nothing of it is
# written anywhere. A group of its own, so it shares no group with anyone.
useradd --system --user-group --no-create-home --home-dir /nonexistent --shell "$NOLOGIN" \
  --comment "Weir worker processes" "$USER_NAME"
echo "worker-user: created system user $USER_NAME (uid $(id -u "$USER_NAME"), no home, $NOLOGIN)"
