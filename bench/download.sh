#!/usr/bin/env bash
# bench/download.sh: pull the same generated model from a real S3 server
# (versitygw, POSIX backend on tmpfs so the source is not the bottleneck)
# with shoal and with rclone, and measure the destination disk's own write
# rate in the same run. Each tool's time includes a final `sync`, so both are
# timed to durable bytes (rclone does not fsync; shoal syncs each file).
# Prints medians and ratios. Needs: versitygw (go install …@v1.8.0), rclone.
#
#   [DEST=/dev/shm] bench/download.sh [SHARDS] [SHARD_MiB] [ROUNDS]    (default 4 512 3)
set -euo pipefail
cd "$(dirname "$0")/.."
SHARDS=${1:-4}; MIB=${2:-512}; ROUNDS=${3:-3}
export PATH="$(go env GOPATH)/bin:$PATH"
command -v versitygw >/dev/null || { echo "need versitygw: go install github.com/versity/versitygw/cmd/versitygw@v1.8.0"; exit 1; }
command -v rclone >/dev/null || { echo "need rclone: apt-get install rclone"; exit 1; }

work=$(mktemp -d "${DEST:-/var/tmp}/shoal-dl-bench.XXXX")   # destination: the real disk (DEST=/dev/shm: memory)
src=$(mktemp -d /dev/shm/shoal-dl-src.XXXX)      # source backend: memory
cleanup() { kill "${vgw:-}" 2>/dev/null || true; rm -rf "$work" "$src"; }
trap cleanup EXIT
go build -o "$work/shoal" ./cmd/shoal

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
unset AWS_CA_BUNDLE  # plain-http endpoint; a CA bundle in the env breaks rclone's S3 client
export AWS_ACCESS_KEY_ID=benchaccess AWS_SECRET_ACCESS_KEY=benchsecret0123456789 AWS_REGION=us-east-1
export AWS_ENDPOINT_URL=http://127.0.0.1:$port
versitygw --access "$AWS_ACCESS_KEY_ID" --secret "$AWS_SECRET_ACCESS_KEY" --port 127.0.0.1:$port --keep-alive --quiet posix "$src" >"$work/vgw.log" 2>&1 &
vgw=$!
for _ in $(seq 100); do curl -s -o /dev/null "$AWS_ENDPOINT_URL" && break; sleep 0.1; done

export RCLONE_CONFIG_S_TYPE=s3 RCLONE_CONFIG_S_PROVIDER=Other RCLONE_CONFIG_S_ENDPOINT=$AWS_ENDPOINT_URL \
  RCLONE_CONFIG_S_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID RCLONE_CONFIG_S_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY \
  RCLONE_CONFIG_S_FORCE_PATH_STYLE=true RCLONE_CONFIG_S_REGION=us-east-1
gen="$work/gen/m"; mkdir -p "$gen"
for i in $(seq 1 "$SHARDS"); do head -c "$((MIB << 20))" /dev/urandom >"$gen/model-0000$i-of-0000$SHARDS.safetensors"; done
head -c 2000 /dev/urandom | base64 >"$gen/config.json"; head -c 3000000 /dev/urandom | base64 >"$gen/tokenizer.json"
head -c 70000 /dev/urandom | base64 >"$gen/modeling_deepseek.py"
rclone mkdir s:models
# Single-part uploads: every object's ETag is its MD5, so both tools can verify.
rclone copy --s3-upload-cutoff 5G "$gen" s:models/m
rm -rf "$work/gen"
bytes=$(( SHARDS * (MIB << 20) ))
echo "model: $SHARDS × $MIB MiB shards + 3 small files from versitygw on 127.0.0.1; destination $(df --output=source,fstype "$work" | tail -1)"

drop() { sync; echo 3 >/proc/sys/vm/drop_caches 2>/dev/null || true; }
secs() { local s e; s=$(date +%s.%N); "$@" >/dev/null 2>"$work/last.err" || { cat "$work/last.err"; exit 1; }; sync; e=$(date +%s.%N); echo "$e - $s" | bc -l; }
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

: >"$work/shoal.t"; : >"$work/rclone.t"; : >"$work/rclone-tuned.t"; : >"$work/disk.t"; : >"$work/shoal-nv.t"; : >"$work/rclone-nv.t"
for r in $(seq 1 "$ROUNDS"); do
  rm -rf "$work/d"; drop
  secs "$work/shoal" model pull s3://models/m --dir "$work/d" --no-progress >>"$work/shoal.t"
  rm -rf "$work/d"; drop
  secs rclone copy s:models/m "$work/d" >>"$work/rclone.t"
  rm -rf "$work/d"; drop
  secs rclone copy --transfers 8 --multi-thread-streams 8 --multi-thread-cutoff 64M s:models/m "$work/d" >>"$work/rclone-tuned.t"
  rm -rf "$work/d"; drop
  secs "$work/shoal" model pull s3://models/m --dir "$work/d" --no-progress --no-verify >>"$work/shoal-nv.t"
  rm -rf "$work/d"; drop
  secs rclone copy --ignore-checksum s:models/m "$work/d" >>"$work/rclone-nv.t"
  rm -rf "$work/d"; drop
  secs dd if=/dev/zero of="$work/dd" bs=16M count=$(( bytes >> 24 )) conv=fdatasync status=none >>"$work/disk.t"
  rm -f "$work/dd"
done
rate() { echo "scale=1; $bytes / $1 / 1048576" | bc -l; }
ratio() { echo "scale=2; $1 / $2" | bc -l; }
s=$(median <"$work/shoal.t"); rc=$(median <"$work/rclone.t"); rt=$(median <"$work/rclone-tuned.t"); d=$(median <"$work/disk.t")
snv=$(median <"$work/shoal-nv.t"); rnv=$(median <"$work/rclone-nv.t")
best=$rc; [ "$(echo "$rt < $rc" | bc -l)" = 1 ] && best=$rt
printf '%-40s %8.2f s  %8s MiB/s\n' \
  "shoal model pull (md5 verified)" "$s" "$(rate "$s")" \
  "rclone copy (defaults, md5 verified)" "$rc" "$(rate "$rc")" \
  "rclone copy (8 transfers × 8 streams)" "$rt" "$(rate "$rt")" \
  "shoal model pull --no-verify" "$snv" "$(rate "$snv")" \
  "rclone copy --ignore-checksum" "$rnv" "$(rate "$rnv")" \
  "disk (dd bs=16M conv=fdatasync)" "$d" "$(rate "$d")"
echo "verified:   shoal vs best rclone $(ratio "$best" "$s")×   shoal vs disk $(echo "scale=0; 100 * $d / $s" | bc -l)%"
echo "unverified: shoal vs rclone $(ratio "$rnv" "$snv")×   shoal vs disk $(echo "scale=0; 100 * $d / $snv" | bc -l)%"
echo "(medians of $ROUNDS rounds, each timed to durable bytes; command: bench/download.sh $SHARDS $MIB $ROUNDS; $(nproc) cores)"
