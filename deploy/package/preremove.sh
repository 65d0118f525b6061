#!/bin/sh
# Runs before the package's files are removed or replaced. An upgrade
# (dpkg: "upgrade", "failed-upgrade"; rpm: $1 = 1) touches no unit: the running
# daemons keep running the old binary until the operator restarts them
# (docs/upgrade.md), and a restarted agent adopts its engines. Only a removal
# (dpkg: "remove", "deconfigure"; rpm: $1 = 0) stops the daemons; an agent
# that exits leaves its engines running unless stop_engines_on_exit is set,
# so move a host's replicas away before removing the package from it.
set -e
case "$1" in
  upgrade | failed-upgrade | 1) exit 0 ;;
esac
if [ -d "${SHOAL_SYSTEMD_RUN_DIR:-/run/systemd/system}" ] && command -v systemctl >/dev/null; then
  for u in shoal-agent shoal-coordinator shoal-router; do
    systemctl stop "$u.service" 2>/dev/null || true
  done
fi
exit 0
