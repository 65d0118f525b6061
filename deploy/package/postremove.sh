#!/bin/sh
# Units are gone: reload systemd. On purge, remove the system user; state
# (/var/lib/shoal*, /etc/shoal secrets) is left for the operator to delete.
set -e
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl daemon-reload || true
fi
case "$1" in
  purge|0)
    if getent passwd shoal >/dev/null; then userdel shoal || true; fi
    if getent group shoal >/dev/null; then groupdel shoal 2>/dev/null || true; fi
    ;;
esac
exit 0
