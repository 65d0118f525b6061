#!/bin/sh
# Create the system user the coordinator and router run as, and tell systemd
# about the units. Nothing is enabled or started: the operator configures
# certificates and keys first (docs/install.md).
set -e
if ! getent group shoal >/dev/null; then
  groupadd --system shoal
fi
if ! getent passwd shoal >/dev/null; then
  useradd --system --gid shoal --home-dir /var/lib/shoal-coordinator --no-create-home --shell /usr/sbin/nologin \
    --comment "shoal coordinator and router" shoal
fi
install -d -m 0750 -o root -g shoal /etc/shoal
install -d -m 0750 -o root -g shoal /etc/shoal/tls
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
  systemctl daemon-reload || true
fi
exit 0
