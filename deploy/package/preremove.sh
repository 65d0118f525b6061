#!/bin/sh
# Stop the daemons before their binary goes away (engines are stopped by the
# agent as it exits).
set -e
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  for u in shoal-agent shoal-coordinator shoal-router; do
    systemctl stop "$u.service" 2>/dev/null || true
  done
fi
exit 0
