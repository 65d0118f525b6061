#!/usr/bin/env bash
# Side-by-side proxy benchmark: the same two simulator backends (instant
# preset: zero GPU time) behind nginx, HAProxy and shoal's router, driven by
# the same load generator in the same run. Prints requests/s and latency added
# over hitting the backends directly, as medians of RUNS interleaved runs.
#   bench/router.sh            (needs: apt-get install nginx-light haproxy)
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
DUR=${DUR:-8s}
export CGO_CFLAGS=${CGO_CFLAGS:--Wno-deprecated-declarations}
for t in nginx haproxy; do command -v $t >/dev/null || { echo "$t missing: apt-get install -y nginx-light haproxy"; exit 1; }; done
go build -o bin/shoal ./cmd/shoal && go build -o bin/shoal-sim ./cmd/shoal-sim && go build -o bin/loadgen ./bench/loadgen
tmp=$(mktemp -d)
pids=()
sim_pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; nginx -c "$tmp/nginx.conf" -s stop 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT
B1=127.0.20.2:8000 B2=127.0.20.3:8000
for b in $B1 $B2; do
  SHOAL_SIM_PRESET=instant SHOAL_SIM_LOAD_SECONDS=0 ./bin/shoal-sim vllm serve m --served-model-name m \
    --host "${b%:*}" --port "${b#*:}" --max-model-len 262144 >"$tmp/sim-${b%:*}.log" 2>&1 &
  pids+=($!)
  sim_pids+=($!)
done
cat >"$tmp/nginx.conf" <<CONF
worker_processes auto; pid $tmp/nginx.pid; error_log $tmp/nginx.err;
events { worker_connections 8192; }
http {
  access_log off;
  upstream sim { server $B1; server $B2; keepalive 512; }
  server {
    listen 127.0.20.10:8080;
    client_max_body_size 64m; client_body_buffer_size 1m;
    location / { proxy_pass http://sim; proxy_http_version 1.1; proxy_set_header Connection "";
                 proxy_buffering off; proxy_request_buffering on; proxy_read_timeout 600s; }
  }
}
CONF
nginx -c "$tmp/nginx.conf"
cat >"$tmp/haproxy.cfg" <<CONF
global
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 600s
  timeout server 600s
  http-reuse always
frontend f
  bind 127.0.20.11:8080
  default_backend sims
backend sims
  balance roundrobin
  server s1 $B1
  server s2 $B2
CONF
haproxy -f "$tmp/haproxy.cfg" >"$tmp/haproxy.log" 2>&1 &
haproxy_pid=$!
pids+=($!)
${ROUTER_ENV:-} ./bin/shoal router --no-api-keys --listen 127.0.20.12:8080 --backend m=$B1 --backend m=$B2 >"$tmp/shoal.log" 2>&1 &
shoal_pid=$!
pids+=($!)
for u in http://$B1 http://$B2 http://127.0.20.10:8080 http://127.0.20.11:8080 http://127.0.20.12:8080; do
  for i in $(seq 1 100); do curl -sf -o /dev/null "$u/v1/models" && break; sleep 0.1; done
done

declare -A target=(
  [direct]="http://$B1/v1/completions,http://$B2/v1/completions"
  [nginx]="http://127.0.20.10:8080/v1/completions"
  [haproxy]="http://127.0.20.11:8080/v1/completions"
  [shoal]="http://127.0.20.12:8080/v1/completions"
)
# CPU time (user+system, clock ticks) of a target's proxy processes: the
# measure that noise on a shared 2-core host disturbs least.
HZ=$(getconf CLK_TCK)
proxy_pids() {
  case $1 in
    nginx) echo "$(cat "$tmp/nginx.pid") $(pgrep -P "$(cat "$tmp/nginx.pid")" | tr '\n' ' ')" ;;
    haproxy) echo "$haproxy_pid" ;;
    shoal) echo "$shoal_pid" ;;
    *) echo "${sim_pids[*]}" ;;
  esac
}
cpu_ticks() { local t=0; for p in $(proxy_pids "$1"); do t=$((t + $(awk '{print $14+$15}' "/proc/$p/stat"))); done; echo $t; }
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }
scenario() { # name concurrency prompt-bytes
  local sc=$1 c=$2 pb=$3
  declare -A rps p50 p99 cpu
  for r in $(seq 1 "$RUNS"); do
    for t in direct nginx haproxy shoal; do
      local c0 c1 line
      c0=$(cpu_ticks "$t")
      line=$(./bin/loadgen -url "${target[$t]}" -c "$c" -d "$DUR" -prompt-bytes "$pb" -name "$t")
      c1=$(cpu_ticks "$t")
      # cpu_us: the proxy's CPU per request (for direct: the backends').
      echo "$line" | jq -c --argjson t $((c1 - c0)) --argjson hz "$HZ" '. + {cpu_us: ($t / $hz * 1e6 / .ok)}' >>"$tmp/$sc-$t.jsonl"
    done
  done
  echo
  echo "scenario $sc: concurrency $c, prompt $pb bytes, $RUNS×$DUR per target, medians"
  printf '%-8s %10s %8s %10s %10s %12s %12s %12s\n' target req/s fail p50_ms p99_ms added_p50 added_p99 cpu_us/req
  local d50 d99
  d50=$(jq -r .p50_ms "$tmp/$sc-direct.jsonl" | median); d99=$(jq -r .p99_ms "$tmp/$sc-direct.jsonl" | median)
  for t in direct nginx haproxy shoal; do
    local f="$tmp/$sc-$t.jsonl"
    rps[$t]=$(jq -r .rps "$f" | median); p50[$t]=$(jq -r .p50_ms "$f" | median); p99[$t]=$(jq -r .p99_ms "$f" | median)
    cpu[$t]=$(jq -r .cpu_us "$f" | median)
    printf '%-8s %10.0f %8s %10.2f %10.2f %12.2f %12.2f %12.1f\n' "$t" "${rps[$t]}" "$(jq -s 'map(.fail)|add' "$f")" \
      "${p50[$t]}" "${p99[$t]}" "$(echo "${p50[$t]} - $d50" | bc -l)" "$(echo "${p99[$t]} - $d99" | bc -l)" "${cpu[$t]}"
  done
  printf 'ratio shoal/nginx req/s: %.2f   shoal/haproxy req/s: %.2f   CPU per request nginx/shoal: %.2f   haproxy/shoal: %.2f\n' \
    "$(echo "${rps[shoal]} / ${rps[nginx]}" | bc -l)" "$(echo "${rps[shoal]} / ${rps[haproxy]}" | bc -l)" \
    "$(echo "${cpu[nginx]} / ${cpu[shoal]}" | bc -l)" "$(echo "${cpu[haproxy]} / ${cpu[shoal]}" | bc -l)"
}
SCENARIOS=${SCENARIOS:-short,large}
[[ $SCENARIOS == *short* ]] && scenario short 64 64
[[ $SCENARIOS == *large* ]] && scenario large 200 204800
true
