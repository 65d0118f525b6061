#!/usr/bin/env bash
# Issue 26's evidence: two agents (one GPU each, chosen by --gpus, each on
# its own loopback address) and a coordinator run examples/torch-pd as a
# deployment with roles: a prefill engine and a decode engine that speak
# vLLM's NixlConnector protocol, driven by the router's two-stage path.
# Measured: time to ready, a completion whose decode ran after a real KV
# pull (bytes, seconds, GB/s), TTFT through the router against direct, the
# warm pair (the first user request pays no handshake), the prefill engine
# SIGKILLed between prefill and decode, the decode engine SIGKILLed
# mid-stream. Writes its evidence under $OUT.
#   BIN=.devrun OUT=/tmp/out test/gpu/run-pd.sh                 (2 GPUs: P on 0, D on 1)
#   GPU_D=0 BIN=.devrun OUT=/tmp/out test/gpu/run-pd.sh         (1 GPU: both on GPU 0)
#   GPU_BACKEND=mock:h200x2 CUDA_VISIBLE_DEVICES= test/gpu/run-pd.sh   (CPU rehearsal, tcp)
set -uo pipefail
cd "$(dirname "$0")/../.."
BIN=${BIN:-bin}; PY=${PY:-python3}; GPU_BACKEND=${GPU_BACKEND:-nvml}
GPU_P=${GPU_P:-0}; GPU_D=${GPU_D:-1}; NET=${NET:-127.0.0}
OUT=${OUT:-$(mktemp -d)}; mkdir -p "$OUT"
dir=$(mktemp -d); pids=()
export SHOAL_COORDINATOR=$NET.1:7950
ROUTER=http://$NET.1:8080
now() { date +%s.%N; }
log() { printf '%s %s\n' "$(date +%T.%3N)" "$*" | tee -a "$OUT/timeline.txt"; }
since() { awk -v a="$(now)" -v b="$1" 'BEGIN { printf "%.2f", a - b }'; }
over() { awk -v a="$(now)" -v b="$1" -v l="$2" 'BEGIN { exit !(a - b > l) }'; }
smi() { command -v nvidia-smi >/dev/null && [ "$GPU_BACKEND" = nvml ] && nvidia-smi "$@" 2>&1 || echo "(no nvidia-smi: $GPU_BACKEND)"; }
apps() { smi --query-compute-apps=pid,gpu_uuid,used_memory --format=csv,noheader | tr '\n' ';'; }
js() { "$PY" -c "import json,sys; d=json.load(sys.stdin); print($1)" 2>/dev/null; }
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  sleep 6; for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done
  log "after shutdown, compute processes: $(apps)"
  smi >"$OUT/nvidia-smi-after.txt"
  tar czf "$OUT/logs.tgz" -C "$dir" . 2>/dev/null
  echo "evidence in $OUT"
}
trap cleanup EXIT
# gpu NODE: the GPU index the agent NODE offers.
gpu() { case "$1" in gpu-0) echo "$GPU_P" ;; gpu-1) echo "$GPU_D" ;; *) echo "?" ;; esac; }
# state ROLE: the role's replica state; head ROLE: its head node; pid ROLE:
# its engine's pid (from the head agent's state file); endpoint ROLE.
rep() { "$BIN/shoal" get replicas -o json 2>/dev/null | js "([r for r in d.get('replicas', []) if r.get('deployment') == 'torch-pd-$1'] or [{}])[0].get('$2', '')"; }
state() { s=$(rep "$1" state); echo "${s:-none}"; }
pid() { "$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["engines"][0]["pid"])' "$dir/$(rep "$1" head)/state.json" 2>/dev/null; }
metric() { curl -s "http://$(rep "$1" endpoint)/metrics" | awk -v m="$2" 'index($1, m "{") == 1 { print $2 }'; }
wait_ready() { # ROLE SINCE LIMIT
  until [ "$(state "$1")" = ready ]; do sleep 0.2; over "$2" "$3" && { log "$1 not ready in $3 s"; return 1; }; done
  return 0
}

# reform ROLE SINCE OUT [PID]: after a kill at SINCE, waits for ROLE's
# replica to go down and serve again (and, with PID, for the killed engine's
# GPU memory to go), then sends a request through the router.
reform() {
  local down="" free="" s
  [ -n "${4:-}" ] || free=1
  while :; do
    s=$(state "$1")
    if [ -z "$down" ] && [ "$s" != ready ]; then down=1; log "$1 replica NOT_SERVING ($s) $(since "$2") s after the kill"; fi
    if [ -z "$free" ] && ! apps | grep -q "^$4,"; then free=1; log "the killed $1 engine holds no GPU memory $(since "$2") s after the kill: $(apps)"; fi
    if [ -n "$down" ] && [ "$s" = ready ]; then log "$1 replica serving again $(since "$2") s after the kill"; break; fi
    over "$2" 300 && { log "$1 not re-formed in 300 s"; exit 1; }
    sleep 0.1
  done
  until [ "$(curl -s -o "$dir/$3.json" -w '%{http_code}' "$ROUTER/v1/completions" -H 'Content-Type: application/json' -d @"$dir/req.json")" = 200 ]; do sleep 0.2; over "$2" 300 && break; done
  log "through the router again $(since "$2") s after the kill: $(js 'd["shoal_example"].get("kv_transfer")' <"$dir/$3.json"); compute processes: $(apps)"
}

smi >"$OUT/nvidia-smi-before.txt"
"$BIN/shoal" agent inspect --gpu-backend "$GPU_BACKEND" --address "$NET.2" >"$OUT/inspect.txt" 2>&1
# Secured as in production: a CA, a certificate per process, one gossip key.
tls="$dir/tls"
"$BIN/shoal" tls ca create --out "$tls/ca" >/dev/null
"$BIN/shoal" tls cert create --coordinator --name coordinator --ip "$NET.1" --ca-dir "$tls/ca" --out "$tls/coordinator" >/dev/null
"$BIN/shoal" tls cert create --cli --name gpu-test --ca-dir "$tls/ca" --out "$tls/cli" >/dev/null
"$BIN/shoal" keyring generate >"$tls/gossip.key"
for d in coordinator gpu-0 gpu-1; do mkdir -p "$tls/$d"; cp "$tls/gossip.key" "$tls/$d/gossip.key"; done
export SHOAL_TLS_DIR="$tls/cli"
"$BIN/shoal" coordinator --address "$NET.1" --gossip-port 17946 --api "$NET.1:7950" --router "$NET.1:8080" \
  --data-dir "$dir/coordinator" --no-api-keys --gossip-profile fast --tls-dir "$tls/coordinator" --gossip-key-file "$tls/coordinator/gossip.key" \
  >"$dir/coordinator.log" 2>&1 &
pids+=($!)
gpus=("$GPU_P" "$GPU_D")
for i in 0 1; do
  "$BIN/shoal" tls cert create --agent --name "gpu-$i" --ip "$NET.$((i + 2))" --ca-dir "$tls/ca" --out "$tls/gpu-$i" >/dev/null
  "$BIN/shoal" agent --node-id "gpu-$i" --address "$NET.$((i + 2))" --join "$NET.1:17946" --state-dir "$dir/gpu-$i" \
    --gpu-backend "$GPU_BACKEND" --gpus "${gpus[$i]}" --gossip-profile fast --stop-grace 5s --restart-backoff 3s --stop-engines-on-exit \
    --tls-dir "$tls/gpu-$i" --gossip-key-file "$tls/gpu-$i/gossip.key" >"$dir/agent-$i.log" 2>&1 &
  pids+=($!)
done
sed "s|ENGINE_PY|$PWD/examples/torch-pd/engine.py|g; s|\"python3\",|\"$PY\",|" examples/torch-pd/deployment.yaml >"$dir/torch-pd.yaml"
until "$BIN/shoal" apply -f "$dir/torch-pd.yaml" >/dev/null 2>&1; do
  sleep 0.3; kill -0 "${pids[0]}" 2>/dev/null || { log "the coordinator exited: $(tail -3 "$dir/coordinator.log")"; exit 1; }
done
t0=$(now); log "applied torch-pd: prefill 1 × 1 GPU, decode 1 × 1 GPU, command engine speaking vLLM's NixlConnector protocol (agent gpu-0 offers GPU $GPU_P, gpu-1 GPU $GPU_D)"
wait_ready prefill "$t0" 300 || exit 1
log "prefill replica ready $(since "$t0") s after apply (head $(rep prefill head), GPU $(gpu "$(rep prefill head)"), $(rep prefill endpoint))"
wait_ready decode "$t0" 300 || exit 1
log "decode replica ready $(since "$t0") s after apply (head $(rep decode head), GPU $(gpu "$(rep decode head)"), $(rep decode endpoint))"
# The router takes the model once its pair is warmed (the coordinator's gate).
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$ROUTER/v1/completions" -H 'Content-Type: application/json' \
  -d '{"model":"torch-pd","prompt":"ready?","max_tokens":1}')" = 200 ]; do sleep 0.2; over "$t0" 300 && { log "router not serving in 300 s"; exit 1; }; done
log "router serves torch-pd $(since "$t0") s after apply; decode engine handshakes so far: $(metric decode torchpd:handshakes_total) (the pair warm-up's)"
{ "$BIN/shoal" get nodes; echo; "$BIN/shoal" get replicas; echo; "$BIN/shoal" describe deployment torch-pd; } >"$OUT/cli.txt" 2>&1
grep -h -i -E 'warm' "$dir/coordinator.log" | tail -3 >>"$OUT/timeline.txt"

# A long prompt (bytes are tokens): its KV is what moves.
prompt=$("$PY" -c 'import sys; print(("shoal moves this prompt'"'"'s KV from the prefill GPU to the decode GPU. " * 200)[:int(sys.argv[1])])' "${PROMPT_TOKENS:-8000}")
body() { "$PY" -c 'import json,sys; print(json.dumps({"model": "torch-pd", "prompt": sys.argv[1], "max_tokens": int(sys.argv[2]), "stream": sys.argv[3] == "1"}))' "$prompt" "$1" "$2"; }
body 64 0 >"$dir/req.json"
curl -s "$ROUTER/v1/completions" -H 'Content-Type: application/json' -d @"$dir/req.json" >"$OUT/completion.json"
log "completion through the router (prefill then decode): $(js '{"prompt_tokens": d["usage"]["prompt_tokens"], "decode": d["shoal_example"]}' <"$OUT/completion.json")"
curl -s "http://$(rep decode endpoint)/v1/completions" -H 'Content-Type: application/json' -d @"$dir/req.json" >"$dir/local.json"
log "same prompt on the decode engine alone (local prefill): $("$PY" -c 'import json,sys; a, b = (json.load(open(f)) for f in sys.argv[1:]); print("token ids equal to the disaggregated answer'"'"'s:", a["token_ids"] == b["token_ids"], "(%d distinct of %d);" % (len(set(a["token_ids"])), len(a["token_ids"])), "KV digest pulled %r, computed locally %r, equal: %s" % (a["shoal_example"]["kv_digest"], b["shoal_example"]["kv_digest"], a["shoal_example"]["kv_digest"] == b["shoal_example"]["kv_digest"]))' "$OUT/completion.json" "$dir/local.json")"
log "compute processes while serving: $(apps)"
smi >"$OUT/nvidia-smi-during.txt"
# TTFT: the first streamed byte, through the router (P, KV pull, D) and
# straight to the decode engine (its own prefill), median of 5 each.
body 16 1 >"$dir/stream.json"
ttft() { for _ in 1 2 3 4 5; do curl -s -o /dev/null -w '%{time_starttransfer}\n' "$1/v1/completions" -H 'Content-Type: application/json' -d @"$dir/stream.json"; done | sort -n | sed -n 3p; }
log "TTFT median of 5, ${PROMPT_TOKENS:-8000}-token prompt: through the router $(ttft "$ROUTER") s; direct to the decode engine (local prefill) $(ttft "http://$(rep decode endpoint)") s; direct to the prefill engine $(ttft "http://$(rep prefill endpoint)") s"
log "decode engine: pulls $(metric decode torchpd:kv_pulls_total), bytes $(metric decode torchpd:kv_pull_bytes_total), seconds $(metric decode torchpd:kv_pull_seconds_total), handshakes $(metric decode torchpd:handshakes_total); prefill engine holds $(metric prefill torchpd:kv_held_blocks) blocks"

# Fault 1: the prefill engine dies between prefill and decode. The two hops
# by hand, as the router sends them.
pb=$("$PY" -c 'import json,sys; b=json.load(open(sys.argv[1])); b.update(max_tokens=1, stream=False, kv_transfer_params={"do_remote_decode": True}); print(json.dumps(b))' "$dir/req.json")
curl -s "http://$(rep prefill endpoint)/v1/completions" -H 'Content-Type: application/json' -d "$pb" >"$dir/prefill.json"
log "prefill hop: kv_transfer_params $(js 'dict(d["kv_transfer_params"], remote_block_ids=len(d["kv_transfer_params"]["remote_block_ids"]))' <"$dir/prefill.json"); prefill engine holds $(metric prefill torchpd:kv_held_blocks) blocks"
ppid=$(pid prefill); dep=$(rep decode endpoint)
log "kill -9 prefill engine (pid $ppid) between prefill and decode"
t1=$(now); kill -9 "$ppid"
db=$("$PY" -c 'import json,sys; b=json.load(open(sys.argv[1])); b["kv_transfer_params"]=json.load(open(sys.argv[2]))["kv_transfer_params"]; print(json.dumps(b))' "$dir/req.json" "$dir/prefill.json")
code=$(curl -s -o "$dir/decode-after-kill.json" -w '%{http_code}' "http://$dep/v1/completions" -H 'Content-Type: application/json' -d "$db")
log "decode hop after the kill: HTTP $code in $(since "$t1") s: $(head -c 300 "$dir/decode-after-kill.json"); decode engine KV use now $(curl -s "http://$dep/metrics" | awk 'index($1, "vllm:kv_cache_usage_perc{") == 1 { print $2 }')"
code=$(curl -s -o "$dir/router-after-kill.json" -w '%{http_code}' "$ROUTER/v1/completions" -H 'Content-Type: application/json' -d @"$dir/req.json")
log "a request through the router while the prefill engine is down: HTTP $code, KV transfer: $(js 'd.get("shoal_example", {}).get("kv_transfer") or "none (the decode engine prefilled locally)"' <"$dir/router-after-kill.json" || head -c 200 "$dir/router-after-kill.json")"
reform prefill "$t1" after-p

# Fault 2: the decode engine dies mid-stream.
body 3000 1 >"$dir/long.json"
dpid=$(pid decode)
curl -sN "$ROUTER/v1/completions" -H 'Content-Type: application/json' -d @"$dir/long.json" >"$dir/stream.out" 2>"$dir/stream.err" &
cpid=$!
until [ "$(grep -c '^data: {' "$dir/stream.out" 2>/dev/null)" -ge 20 ]; do sleep 0.05; kill -0 "$cpid" 2>/dev/null || break; done
log "kill -9 decode engine (pid $dpid) mid-stream, after $(grep -c '^data: {' "$dir/stream.out") chunks"
t2=$(now); kill -9 "$dpid"
wait "$cpid"; rc=$?
log "the client's stream ended $(since "$t2") s after the kill: curl rc $rc, $(grep -c '^data: {' "$dir/stream.out") chunks, [DONE] $(grep -c '^data: \[DONE\]' "$dir/stream.out"), last line: $(grep -v '^$' "$dir/stream.out" | tail -1 | head -c 200)"
reform decode "$t2" after-d "$dpid"
log "prefill engine holds $(metric prefill torchpd:kv_held_blocks) blocks, decode engine KV use $(metric decode vllm:kv_cache_usage_perc)"
# Shut down as an operator would: delete the deployment, then stop the agents
# (which, started with --stop-engines-on-exit, would stop any engine left).
engines="$(pid prefill) $(pid decode)"
alive() { for p in $engines; do kill -0 "$p" 2>/dev/null && echo "$p"; done; }
t3=$(now); "$BIN/shoal" delete deployment torch-pd >>"$OUT/cli.txt" 2>&1
until [ -z "$(alive)" ] && { [ -z "$(apps)" ] || [ "$GPU_BACKEND" != nvml ]; }; do sleep 0.2; over "$t3" 60 && break; done
log "deleted torch-pd: $(since "$t3") s later engines (pids $engines) still running: $(alive | tr '\n' ' '); compute processes: $(apps)"
