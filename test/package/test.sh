#!/usr/bin/env bash
# Install the .deb built by `make package` on this machine with dpkg, check
# what it put where (binary, units, configs, system user), verify the units
# with systemd-analyze, run `shoal version`, then purge it and check that it
# is gone. Needs root; run by `make test-package` (and CI).
set -euo pipefail
cd "$(dirname "$0")/../.."
deb=$(ls -t dist/shoal_*_amd64.deb | head -1)
fail() { echo "FAIL: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
dpkg -s shoal >/dev/null 2>&1 && fail "shoal is already installed here; refusing to touch it"

echo "== contents of $deb"
files=$(dpkg-deb --contents "$deb" | awk '{print $6}' | sort)
echo "$files"
for f in ./usr/bin/shoal ./lib/systemd/system/shoal-agent.service ./etc/shoal/agent.yaml ./usr/share/shoal/grafana/shoal.json; do
  grep -qx -- "$f" <<<"$files" || fail "$f missing from the package"
done

echo "== install"
wants_before=$(ls /etc/systemd/system/multi-user.target.wants 2>/dev/null | grep -c '^shoal' || true)
dpkg -i "$deb"
trap 'dpkg --purge shoal >/dev/null 2>&1 || true' EXIT
/usr/bin/shoal version | grep -q "^shoal 0.1.0" || fail "shoal version: $(/usr/bin/shoal version)"
getent passwd shoal >/dev/null || fail "system user shoal not created"
[ "$(getent passwd shoal | cut -d: -f7)" = /usr/sbin/nologin ] || fail "shoal user has a login shell"
[ "$(stat -c '%U:%G %a' /etc/shoal)" = "root:shoal 750" ] || fail "/etc/shoal is $(stat -c '%U:%G %a' /etc/shoal)"
for u in agent coordinator router; do
  f=/lib/systemd/system/shoal-$u.service
  [ -f "$f" ] || fail "$f missing"
  out=$(systemd-analyze verify "$f" 2>&1 || true)
  # systemd-analyze also reports on unrelated units of this machine; only ours count.
  if echo "$out" | grep "shoal-$u.service" | grep -v "Command .* is not executable"; then fail "systemd-analyze verify $f"; fi
  grep -q '^Type=notify' "$f" || fail "$f is not Type=notify"
done
grep -q '^KillMode=process' /lib/systemd/system/shoal-agent.service || fail "agent unit would kill engines with the agent"
grep -q '^LimitMEMLOCK=infinity' /lib/systemd/system/shoal-agent.service || fail "agent unit lacks unlimited memlock"
wants_after=$(ls /etc/systemd/system/multi-user.target.wants 2>/dev/null | grep -c '^shoal' || true)
[ "$wants_before" = "$wants_after" ] || fail "installing enabled a unit"
# The shipped agent config is valid YAML: the agent stops at the missing address, not at parsing.
out=$(/usr/bin/shoal agent --config /etc/shoal/agent.yaml --insecure --gpu-backend none 2>&1 || true)
echo "$out" | grep -q "address" || fail "agent with the shipped config: $out"
echo "$out" | grep -qi "yaml" && fail "shipped agent config does not parse: $out"

echo "== run as installed: secrets, users, rotation, restarts"
bash test/package/install.sh

echo "== an upgrade stops no daemon; a removal does"
fake=$(mktemp -d)
mkdir -p "$fake/bin" "$fake/run-systemd"
printf '#!/bin/sh\necho "$@" >> %s/calls\n' "$fake" > "$fake/bin/systemctl"
chmod +x "$fake/bin/systemctl"
prerm=/var/lib/dpkg/info/shoal.prerm
[ -x "$prerm" ] || fail "no prerm script installed"
for arg in upgrade failed-upgrade; do
  SHOAL_SYSTEMD_RUN_DIR="$fake/run-systemd" PATH="$fake/bin:$PATH" "$prerm" "$arg" 0.1.1
done
[ ! -e "$fake/calls" ] || fail "prerm upgrade called systemctl: $(cat "$fake/calls")"
SHOAL_SYSTEMD_RUN_DIR="$fake/run-systemd" PATH="$fake/bin:$PATH" "$prerm" remove
[ "$(grep -c '^stop shoal-' "$fake/calls")" = 3 ] || fail "prerm remove did not stop the three units: $(cat "$fake/calls" 2>/dev/null)"
rm -rf "$fake"

echo "== purge"
dpkg --purge shoal
trap - EXIT
[ ! -e /usr/bin/shoal ] || fail "/usr/bin/shoal left behind"
[ ! -e /lib/systemd/system/shoal-agent.service ] || fail "unit left behind"
getent passwd shoal >/dev/null && fail "system user left behind"
echo "package test passed: $deb"
