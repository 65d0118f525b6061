#!/usr/bin/env bash
# Issue 12's evidence on a host with 2 GPUs: two agents (one GPU each, chosen
# by --gpus, each on its own loopback address) and a coordinator form a
# replica of examples/torch-tp (NCCL across the two GPUs) through the command
# engine kind; a completion runs on both GPUs; then the worker rank is
# SIGKILLed and the group's detection, teardown (GPUs freed) and re-forming
# are timed. Writes its evidence under $OUT.
#   BIN=.devrun OUT=/tmp/out test/gpu/run.sh          (on the GPU host)
#   GPU_BACKEND=mock:h200x2 PY=/usr/bin/python3 test/gpu/run.sh   (CPU rehearsal)
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}; PY=${PY:-python3}; GPU_BACKEND=${GPU_BACKEND:-nvml}
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
dir=$(mktemp -d); pids=()
export SHOAL_COORDINATOR=127.0.0.1:7950
now() { date +%s.%N; }
log() { printf '%s %s\n' "$(date +%T.%3N)" "$*" | tee -a "$OUT/timeline.txt"; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f", a - b }'; }
over() { awk -v a="$(now)" -v b="$1" -v l="$2" 'BEGIN { exit !(a - b > l) }'; }
smi() { command -v nvidia-smi >/dev/null && nvidia-smi "$@" 2>&1 || echo "(no nvidia-smi: $GPU_BACKEND)"; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 6; for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  log "after shutdown, compute processes: $(smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader | tr '\n' ';')"
  tar czf "$OUT/logs.tgz" -C "$dir" . 2>/dev/null
  echo "evidence in $OUT"
}
trap cleanup EXIT
state() { "$BIN/shoal" get replicas -o json 2>/dev/null | "$PY" -c 'import json,sys; r=json.load(sys.stdin)["replicas"]; print(r[0]["state"] if r else "none")' 2>/dev/null || echo none; }

"$BIN/shoal" agent inspect --gpu-backend "$GPU_BACKEND" --address 127.0.0.2 >"$OUT/inspect.txt" 2>&1
# Secured as in production: a CA, a certificate per process, one gossip key.
tls="$dir/tls"
"$BIN/shoal" tls ca create --out "$tls/ca" >/dev/null
"$BIN/shoal" tls cert create --coordinator --name coordinator --ip 127.0.0.1 --ca-dir "$tls/ca" --out "$tls/coordinator" >/dev/null
"$BIN/shoal" tls cert create --cli --name gpu-test --ca-dir "$tls/ca" --out "$tls/cli" >/dev/null
"$BIN/shoal" keyring generate >"$tls/gossip.key"
for d in coordinator gpu-0 gpu-1; do mkdir -p "$tls/$d"; cp "$tls/gossip.key" "$tls/$d/gossip.key"; done
export SHOAL_TLS_DIR="$tls/cli"
"$BIN/shoal" coordinator --address 127.0.0.1 --gossip-port 17946 --api 127.0.0.1:7950 --router 127.0.0.1:8080 \
  --data-dir "$dir/coordinator" --no-api-keys --gossip-profile fast --tls-dir "$tls/coordinator" --gossip-key-file "$tls/coordinator/gossip.key" \
  >"$dir/coordinator.log" 2>&1 &
pids+=($!)
for i in 0 1; do
  "$BIN/shoal" tls cert create --agent --name "gpu-$i" --ip "127.0.0.$((i + 2))" --ca-dir "$tls/ca" --out "$tls/gpu-$i" >/dev/null
  "$BIN/shoal" agent --node-id "gpu-$i" --address "127.0.0.$((i + 2))" --join 127.0.0.1:17946 --state-dir "$dir/gpu-$i" \
    --gpu-backend "$GPU_BACKEND" --gpus "$i" --gossip-profile fast --stop-grace 5s --restart-backoff 3s \
    --tls-dir "$tls/gpu-$i" --gossip-key-file "$tls/gpu-$i/gossip.key" >"$dir/agent-$i.log" 2>&1 &
  pids+=($!)
done
sed "s|ENGINE_PY|$PWD/examples/torch-tp/engine.py|g; s|\"python3\",|\"$PY\",|" examples/torch-tp/deployment.yaml >"$dir/torch.yaml"
until "$BIN/shoal" apply -f "$dir/torch.yaml" >/dev/null 2>&1; do
  sleep 0.3; kill -0 "${pids[0]}" 2>/dev/null || { log "the coordinator exited: $(tail -3 "$dir/coordinator.log")"; exit 1; }
done
t0=$(now); log "applied torch-tp: 1 replica × 2 nodes × 1 GPU (command engine, NCCL)"
until [ "$(state)" = ready ]; do sleep 0.2; over "$t0" 300 && { log "not ready in 300 s"; exit 1; }; done
log "replica ready $(since "$t0") s after apply"
{ "$BIN/shoal" get nodes; echo; "$BIN/shoal" get replicas; echo; "$BIN/shoal" describe deployment torch-tp; } >"$OUT/cli.txt" 2>&1
curl -s http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \
  -d '{"model":"torch-tp","prompt":"hello","max_tokens":32}' >"$OUT/completion.json"
log "completion: $(head -c 300 "$OUT/completion.json")"
log "compute processes while serving: $(smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader | tr '\n' ';')"
worker=$("$BIN/shoal" get nodes -o json | "$PY" -c 'import json,sys; print([n["nodeId"] for n in json.load(sys.stdin)["nodes"] if n["role"]=="worker"][0])')
wpid=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["engines"][0]["pid"])' "$dir/$worker/state.json")
log "kill -9 worker rank: node $worker, engine pid $wpid"
t1=$(now); kill -9 "$wpid"
seen_down=""; seen_free=""
while :; do
  s=$(state)
  if [ -z "$seen_down" ] && [ "$s" != ready ]; then seen_down=1; log "replica NOT_SERVING ($s) $(since "$t1") s after the kill"; fi
  if [ -z "$seen_free" ] && command -v nvidia-smi >/dev/null && [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader)" ]; then
    seen_free=1; log "no compute process on either GPU $(since "$t1") s after the kill: $(nvidia-smi --query-gpu=index,memory.used --format=csv,noheader | tr '\n' ';')"
  fi
  if [ -n "$seen_down" ] && [ "$s" = ready ]; then log "replica serving again $(since "$t1") s after the kill"; break; fi
  over "$t1" 300 && { log "not re-formed in 300 s"; exit 1; }
  sleep 0.1
done
curl -s http://127.0.0.1:8080/v1/completions -H 'Content-Type: application/json' \
  -d '{"model":"torch-tp","prompt":"again","max_tokens":8}' >>"$OUT/completion.json"
log "completion after re-forming: $(tail -c 200 "$OUT/completion.json")"
log "compute processes after re-forming: $(smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader | tr '\n' ';')"
