package rdma

import (
	"fmt"
	"net"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// NCCLEnv derives NCCL/GLOO settings from the adapters found and the
// interface that carries the node's own address. Entries in override (the
// deployment spec's engine.env) win.
func NCCLEnv(hcas []HCA, ifname string, override map[string]string) map[string]string {
	env := map[string]string{}
	var active []string
	gid := -1
	for _, h := range hcas {
		for _, p := range h.Ports {
			if !p.Active() {
				continue
			}
			active = append(active, h.Name+":"+strconv.Itoa(p.Num))
			if p.RoCE() && p.RoCEv2GID >= 0 && gid < 0 {
				gid = p.RoCEv2GID
			}
		}
	}
	sort.Strings(active)
	if len(active) == 0 {
		env["NCCL_IB_DISABLE"] = "1" // no usable HCA: NCCL over TCP sockets
	} else {
		env["NCCL_IB_DISABLE"] = "0"
		env["NCCL_IB_HCA"] = strings.Join(active, ",")
		if gid >= 0 {
			env["NCCL_IB_GID_INDEX"] = strconv.Itoa(gid)
		}
	}
	if ifname != "" {
		env["NCCL_SOCKET_IFNAME"] = ifname
		env["GLOO_SOCKET_IFNAME"] = ifname
	}
	for k, v := range override {
		env[k] = v
	}
	return env
}

// Interfaces lists network interfaces with their addresses; a seam for tests.
type Interfaces func() ([]net.Interface, func(net.Interface) ([]net.Addr, error), error)

// HostInterfaces reads the host's interfaces.
func HostInterfaces() ([]net.Interface, func(net.Interface) ([]net.Addr, error), error) {
	ifs, err := net.Interfaces()
	return ifs, func(i net.Interface) ([]net.Addr, error) { return i.Addrs() }, err
}

// IfaceFor finds the interface that carries ip.
func IfaceFor(ip string, list Interfaces) (string, error) {
	want := net.ParseIP(ip)
	if want == nil {
		return "", fmt.Errorf("rdma: %q is not an IP address", ip)
	}
	ifs, addrs, err := list()
	if err != nil {
		return "", err
	}
	for _, i := range ifs {
		as, err := addrs(i)
		if err != nil {
			continue
		}
		for _, a := range as {
			if n, ok := a.(*net.IPNet); ok && n.IP.Equal(want) {
				return i.Name, nil
			}
		}
	}
	return "", fmt.Errorf("rdma: no interface carries %s", ip)
}

// Affinity is the best adapter for one GPU.
type Affinity struct {
	GPU      int    `json:"gpu"`
	HCA      string `json:"hca"`
	Relation string `json:"relation"` // PCIe switch, NUMA node, or system
}

// GPUAffinity pairs each GPU (PCI address, NUMA node) with the closest active
// adapter: one under the same PCIe switch first (the resolved sysfs device
// paths share a bridge below the root port), then one on the same NUMA node.
func GPUAffinity(sysRoot string, gpuPCI []string, gpuNUMA []int, hcas []HCA) []Affinity {
	var out []Affinity
	for g := range gpuPCI {
		gp := pciPath(sysRoot, gpuPCI[g])
		best, rank := "", 0 // rank 3 switch, 2 NUMA, 1 system
		for _, h := range hcas {
			if !hasActive(h) {
				continue
			}
			r := 1
			if gp != nil && sharedBridges(gp, pciPath(sysRoot, h.PCIAddr)) >= 2 {
				r = 3
			} else if g < len(gpuNUMA) && gpuNUMA[g] >= 0 && gpuNUMA[g] == h.NUMANode {
				r = 2
			}
			if r > rank {
				best, rank = h.Name, r
			}
		}
		if best != "" {
			out = append(out, Affinity{GPU: g, HCA: best, Relation: map[int]string{3: "PCIe switch", 2: "NUMA node", 1: "system"}[rank]})
		}
	}
	return out
}

func hasActive(h HCA) bool {
	for _, p := range h.Ports {
		if p.Active() {
			return true
		}
	}
	return false
}

// pciPath resolves /sys/bus/pci/devices/ADDR to its place in the device tree,
// as path elements from the root complex (pciDDDD:BB) down; nil if unknown.
func pciPath(sysRoot, addr string) []string {
	addr = normalizePCI(addr)
	if addr == "" {
		return nil
	}
	p, err := filepath.EvalSymlinks(filepath.Join(sysRoot, "bus", "pci", "devices", addr))
	if err != nil {
		return nil
	}
	parts := strings.Split(filepath.ToSlash(p), "/")
	for i, e := range parts {
		if strings.HasPrefix(e, "pci") && strings.Contains(e, ":") {
			return parts[i:]
		}
	}
	return nil
}

// normalizePCI turns NVML's 8-digit PCI domain (00000000:00:06.0, as seen on
// a real H200) into sysfs's 4-digit form (0000:00:06.0).
func normalizePCI(addr string) string {
	addr = strings.ToLower(addr)
	if dom, rest, ok := strings.Cut(addr, ":"); ok && len(dom) == 8 && strings.HasPrefix(dom, "0000") {
		return dom[4:] + ":" + rest
	}
	return addr
}

// sharedBridges counts the bridges two devices share below their root complex.
func sharedBridges(a, b []string) int {
	if len(a) == 0 || len(b) == 0 || a[0] != b[0] {
		return 0
	}
	n := 0
	for i := 1; i < len(a)-1 && i < len(b)-1 && a[i] == b[i]; i++ {
		n++
	}
	return n
}
