#!/usr/bin/env bash
# Regenerates the sysfs trees the rdma tests read. Layout: the kernel's
# Documentation/ABI/stable/sysfs-class-infiniband and sysfs-bus-pci; values as
# ConnectX-7 (NDR IB) and ConnectX-6 Dx (RoCE) hosts report them.
set -euo pipefail
cd "$(dirname "$0")"
rm -rf ib8 roce2 none
# ib8: a DGX-style host, 8 × mlx5 NDR IB; GPU i and HCA i under PCIe switch i.
for i in $(seq 0 7); do
  s=ib8/sys
  sw="devices/pci0000:a$i/0000:a$i:01.0/0000:b$i:00.0"
  hca="$sw/0000:c$i:00.0"; gpu="$sw/0000:d$i:00.0"
  mkdir -p "$s/$hca/net/ibp${i}s0" "$s/$gpu" "$s/bus/pci/devices" "$s/class/infiniband" "$s/class/infiniband_verbs/uverbs$i" ib8/dev/infiniband
  printf 'DRIVER=mlx5_core\nPCI_SLOT_NAME=0000:c%d:00.0\n' "$i" >"$s/$hca/uevent"
  echo up >"$s/$hca/net/ibp${i}s0/operstate"; printf '00:00:10:87:fe:80:00:00:00:00:00:00:b8:ce:f6:03:00:a1:b2:c%d\n' "$i" >"$s/$hca/net/ibp${i}s0/address"
  echo $((i / 4)) >"$s/$hca/numa_node"; echo $((i / 4)) >"$s/$gpu/numa_node"
  ln -s "../../../$hca" "$s/bus/pci/devices/0000:c$i:00.0"
  ln -s "../../../$gpu" "$s/bus/pci/devices/0000:d$i:00.0"
  d="$s/class/infiniband/mlx5_$i"; mkdir -p "$d/ports/1/gids" "$d/ports/1/gid_attrs/types" "$d/ports/1/gid_attrs/ndevs"
  ln -s "../../../$hca" "$d/device"
  printf 'b8ce:f603:00a1:b2c%d\n' "$i" >"$d/node_guid"; echo 28.39.1002 >"$d/fw_ver"; echo MT4129 >"$d/hca_type"
  echo "4: ACTIVE" >"$d/ports/1/state"; echo "5: LinkUp" >"$d/ports/1/phys_state"
  echo InfiniBand >"$d/ports/1/link_layer"; echo "400 Gb/sec (4X NDR)" >"$d/ports/1/rate"
  printf 'fe80:0000:0000:0000:b8ce:f603:00a1:b2c%d\n' "$i" >"$d/ports/1/gids/0"; echo "IB/RoCE v1" >"$d/ports/1/gid_attrs/types/0"
  echo "mlx5_$i" >"$s/class/infiniband_verbs/uverbs$i/ibdev"; : >"ib8/dev/infiniband/uverbs$i"
done
# roce2: two ConnectX-6 Dx ports as RoCE v2; mlx5_1's link is down.
s=roce2/sys
mkdir -p "$s/class/infiniband" roce2/dev/infiniband "$s/bus/pci/devices"
for i in 0 1; do
  dev="devices/pci0000:30/0000:30:02.0/0000:3$((i + 1)):00.0"
  mkdir -p "$s/$dev/net/ens${i}f0" "$s/class/infiniband_verbs/uverbs$i"
  printf 'DRIVER=mlx5_core\nPCI_SLOT_NAME=0000:3%d:00.0\n' $((i + 1)) >"$s/$dev/uevent"; echo 0 >"$s/$dev/numa_node"
  echo up >"$s/$dev/net/ens${i}f0/operstate"; echo "0c:42:a1:f1:2a:3$i" >"$s/$dev/net/ens${i}f0/address"
  ln -s "../../../$dev" "$s/bus/pci/devices/0000:3$((i + 1)):00.0"
  d="$s/class/infiniband/mlx5_$i"; mkdir -p "$d/ports/1/gids" "$d/ports/1/gid_attrs/types" "$d/ports/1/gid_attrs/ndevs"
  ln -s "../../../$dev" "$d/device"
  printf '0c42:a103:00f1:2a3%d\n' "$i" >"$d/node_guid"; echo 22.36.1010 >"$d/fw_ver"; echo MT4125 >"$d/hca_type"
  if [ $i = 0 ]; then echo "4: ACTIVE" >"$d/ports/1/state"; echo "5: LinkUp" >"$d/ports/1/phys_state"
  else echo "1: DOWN" >"$d/ports/1/state"; echo "3: Disabled" >"$d/ports/1/phys_state"; fi
  echo Ethernet >"$d/ports/1/link_layer"; echo "200 Gb/sec (4X HDR)" >"$d/ports/1/rate"
  # GIDs: 0 v1 link-local, 1 v2 link-local, 2 v1 IPv4, 3 v2 IPv4 (the one NCCL wants).
  echo "fe80:0000:0000:0000:0e42:a1ff:fef1:2a3$i" >"$d/ports/1/gids/0"; echo "IB/RoCE v1" >"$d/ports/1/gid_attrs/types/0"
  echo "fe80:0000:0000:0000:0e42:a1ff:fef1:2a3$i" >"$d/ports/1/gids/1"; echo "RoCE v2" >"$d/ports/1/gid_attrs/types/1"
  echo "0000:0000:0000:0000:0000:ffff:0a00:000$((i + 2))" >"$d/ports/1/gids/2"; echo "IB/RoCE v1" >"$d/ports/1/gid_attrs/types/2"
  echo "0000:0000:0000:0000:0000:ffff:0a00:000$((i + 2))" >"$d/ports/1/gids/3"; echo "RoCE v2" >"$d/ports/1/gid_attrs/types/3"
  for g in 0 1 2 3; do echo "ens${i}f0" >"$d/ports/1/gid_attrs/ndevs/$g"; done
  echo "mlx5_$i" >"$s/class/infiniband_verbs/uverbs$i/ibdev"; : >"roce2/dev/infiniband/uverbs$i"
done
# git keeps no empty directory: every one holds a file, as in real sysfs.
# none: a host without RDMA.
mkdir -p none/sys/class/net/eth0 none/dev
: >none/sys/class/net/eth0/.keep; : >none/dev/.keep
