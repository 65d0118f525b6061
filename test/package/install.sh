#!/usr/bin/env bash
# The installed package as an operator runs it (docs/install.md): secrets made
# as the docs say (as root), the coordinator and a standalone router as user
# shoal, an agent as root (on the simulator: no GPUs here), an authenticated
# completion, a gossip-key rotation, every daemon restarted, and another
# completion. systemd is absent in CI: the daemons run as processes with the
# units' users. Called by test.sh with the package installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "FAIL: $*" >&2; for f in "$work"/*.log; do echo "== $f" >&2; tail -20 "$f" >&2; done; exit 1; }
work=$(mktemp -d)
pids=()
stop() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done; pids=(); }
cleanup() {
  stop
  # The agent leaves its engines running when it stops (a restart adopts
  # them); they run as ray and vllm, so find them by their executable, and
  # again until none is left (one may still be starting).
  for _ in $(seq 25); do
    left=0
    for e in /proc/[0-9]*/exe; do
      case "$(readlink "$e" 2>/dev/null)" in "$work/sim/"*) left=1; kill "$(basename "$(dirname "$e")")" 2>/dev/null || true ;; esac
    done
    [ "$left" = 0 ] && break
    sleep 0.2
  done
  rm -rf "$work" /etc/shoal/tls/* /etc/shoal/router-tls /etc/shoal/gossip.key /etc/shoal/api-keys.yaml /var/lib/shoal-coordinator
}
trap cleanup EXIT
S=/usr/bin/shoal
C=127.0.40.1 R=127.0.40.2 A=127.0.40.11

echo "== the simulator for the agent's engines"
go build -o "$work/sim/shoal-sim" ./cmd/shoal-sim
for b in ray vllm python3; do ln -sf "$work/sim/shoal-sim" "$work/sim/$b"; done

echo "== secrets, as docs/install.md makes them"
$S tls ca create --out "$work/ca"
$S tls cert create --coordinator --name ctl --ip $C --ca-dir "$work/ca" --out /etc/shoal/tls
$S tls cert create --agent --name gpu-01 --ip $A --ca-dir "$work/ca" --out "$work/gpu-01"
$S tls cert create --router --name edge-1 --ip $R --ca-dir "$work/ca" --out /etc/shoal/router-tls
$S tls cert create --cli --name alice --ca-dir "$work/ca" --out "$work/cli"
$S keyring generate > /etc/shoal/gossip.key
chgrp shoal /etc/shoal/gossip.key && chmod 0660 /etc/shoal/gossip.key
key=$($S apikey create --name team-a --models '*' --file /etc/shoal/api-keys.yaml 2>/dev/null)
[ "$(stat -c '%U:%G %a' /etc/shoal/api-keys.yaml)" = "root:shoal 640" ] || fail "api keys file is $(stat -c '%U:%G %a' /etc/shoal/api-keys.yaml)"
[ "$(stat -c '%G' /etc/shoal/tls/coordinator-key.pem)" = shoal ] || fail "coordinator key is $(stat -c '%U:%G %a' /etc/shoal/tls/coordinator-key.pem)"
install -d -m 0750 -o shoal -g shoal /var/lib/shoal-coordinator   # the unit's StateDirectory

run_daemons() {
  setpriv --reuid=shoal --regid=shoal --init-groups -- $S coordinator --address $C --api $C:7950 --router $C:8080 --metrics-addr $C:7951 \
    --data-dir /var/lib/shoal-coordinator --gossip-profile fast >>"$work/coordinator.log" 2>&1 &
  pids+=($!)
  sleep 1
  $S agent --address $A --join $C:7946 --tls-dir "$work/gpu-01" --state-dir "$work/agent" --gpu-backend mock:h200x8 \
    --ray-bin "$work/sim/ray" --vllm-bin "$work/sim/vllm" --python-bin "$work/sim/python3" --skip-local-model-check \
    --gossip-profile fast --engine-env SHOAL_SIM_LOAD_SECONDS=0.5 >>"$work/agent.log" 2>&1 &
  pids+=($!)
  setpriv --reuid=shoal --regid=shoal --init-groups -- $S router --address $R --join $C:7946 --listen $R:8080 --tls-dir /etc/shoal/router-tls \
    --gossip-profile fast >>"$work/router.log" 2>&1 &
  pids+=($!)
}
# The CLI as alice (the daemons must not see these: SHOAL_TLS_DIR is theirs too).
cli() { SHOAL_TLS_DIR="$work/cli" SHOAL_COORDINATOR=$C:7950 $S "$@"; }
completion() { # $1: router address; prints the HTTP status
  curl -s -o "$work/out.json" -w '%{http_code}' "http://$1/v1/completions" -H "Authorization: Bearer $key" \
    -H 'Content-Type: application/json' -d '{"model":"tiny","prompt":"Hello","max_tokens":4}' || true
}
served() { # wait until both routers serve an authenticated completion
  for _ in $(seq 150); do
    if [ "$(completion $C:8080)" = 200 ] && [ "$(completion $R:8080)" = 200 ]; then return 0; fi
    sleep 0.2
  done
  fail "no completion through both routers: $(cat "$work/out.json" 2>/dev/null)"
}

echo "== the daemons: coordinator and router as user shoal, the agent as root"
run_daemons
for _ in $(seq 100); do cli get nodes >/dev/null 2>&1 && break; sleep 0.2; done
cli apply -f - <<'YAML' || fail "apply"
apiVersion: shoal/v1
name: tiny
model: {source: /models/tiny}
engine: {kind: ray-vllm, servedModelName: tiny, tensorParallelSize: 8}
resources: {nodes: 1, gpusPerNode: 8}
YAML
served
code=$(curl -s -o /dev/null -w '%{http_code}' "http://$R:8080/v1/completions" -H 'Content-Type: application/json' -d '{"model":"tiny","prompt":"x"}')
[ "$code" = 401 ] || fail "a request without a key got $code"

echo "== rotate the gossip key"
old=$(head -1 /etc/shoal/gossip.key)
new=$($S keyring generate)
cli keyring install "$new" || fail "keyring install"
cli keyring use "$new" || fail "keyring use"
cli keyring remove "$old" || fail "keyring remove"
for _ in $(seq 50); do [ "$(head -1 /etc/shoal/gossip.key)" = "$new" ] && ! grep -q "$old" /etc/shoal/gossip.key && break; sleep 0.2; done
[ "$(head -1 /etc/shoal/gossip.key)" = "$new" ] || fail "the rotation did not reach /etc/shoal/gossip.key"
grep -q "$old" /etc/shoal/gossip.key && fail "the old key is still in the file"
[ "$(stat -c '%U:%G %a' /etc/shoal/gossip.key)" = "root:shoal 660" ] || fail "gossip.key is now $(stat -c '%U:%G %a' /etc/shoal/gossip.key)"
grep -qi "cannot save gossip keys\|permission denied" "$work"/*.log && fail "a daemon could not save the keys"

echo "== upgrade to the next version while everything runs: nothing stops"
engine_pid() { pgrep -f "vllm serve /models/tiny" | head -1 || true; }
epid=$(engine_pid)
[ -n "$epid" ] || fail "no engine process"
make -s package PKG_VERSION=0.1.1 >/dev/null
mv dist/shoal_0.1.1_amd64.deb "$work/" && rm -f dist/shoal-0.1.1*.rpm
dpkg -i "$work/shoal_0.1.1_amd64.deb" >/dev/null
/usr/bin/shoal version | grep -q "^shoal 0.1.1" || fail "not upgraded: $(/usr/bin/shoal version)"
for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null || fail "the upgrade stopped a daemon (pid $p)"; done
[ "$(completion $C:8080)" = 200 ] || fail "no completion right after the upgrade"

echo "== restart every daemon (on the new binary): the agent adopts its engine"
stop
run_daemons
served
[ "$(engine_pid)" = "$epid" ] || fail "the engine was restarted ($epid → $(engine_pid)); the new agent should adopt it"
echo "installed-package test passed: authenticated completions before and after a key rotation and restarts"
