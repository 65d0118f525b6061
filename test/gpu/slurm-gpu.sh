#!/bin/bash
# On the GPU host: the NVML minor numbers, then an agent in --slurm mode
# with the step environment Slurm would give it (job 42, its GPU by device
# number), showing the GPU it owns by UUID; a device number the host lacks
# is an error. Evidence in test/gpu/evidence-slurm/.
#   (here) go build -o .devrun/shoal ./cmd/shoal; go test -c -o .devrun/gpu.test ./gpu
#   (GPU host) BIN=.devrun GPU_TEST=.devrun/gpu.test OUT=/tmp/out test/gpu/slurm-gpu.sh
set -u
${GPU_TEST:-./gpu.test} -test.run TestRealNVML -test.v 2>&1 | tail -8
nvidia-smi --query-gpu=index,uuid,pci.bus_id --format=csv
minor=$(cat /proc/driver/nvidia/gpus/*/information 2>/dev/null | awk '/Device Minor/ {print $3; exit}')
echo "device minor from /proc: ${minor:-?}"
ls -la /dev/nvidia[0-9]* 2>&1 | head
for step in "${minor:-0}" 9; do
  echo "== SLURM_STEP_GPUS=$step"
  SLURM_JOB_ID=42 SLURMD_NODENAME=h200 SLURM_NODEID=0 SLURM_JOB_NUM_NODES=1 SLURM_JOB_NODELIST=h200 SLURM_STEP_GPUS=$step \
    timeout 6 "${BIN:-.}/shoal" agent --slurm --join 127.0.0.1:1 --insecure --state-dir "$OUT/state-$step" 2>&1 | grep -E "hardware found|gpus:|error|Error" | head -5
done
