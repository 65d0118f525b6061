// Package rdma discovers RDMA adapters (InfiniBand and RoCE) under a sysfs
// root, derives the NCCL/GLOO settings a multi-node engine needs from what it
// found, and checks the host limits RDMA needs (memlock, /dev/shm, IPC_LOCK).
// No adapter is a state ("no HCA": NCCL over sockets), never an error.
//
// The layout read is the kernel's Documentation/ABI/stable/sysfs-class-infiniband:
// class/infiniband/DEV/{node_guid,fw_ver,hca_type,device/uevent,device/numa_node,
// device/net/IF} and ports/N/{state,phys_state,link_layer,rate,gids/I,
// gid_attrs/types/I,gid_attrs/ndevs/I}.
package rdma
