package rdma

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
)

// Port is one port of an adapter.
type Port struct {
	Num       int     `json:"num"`
	State     string  `json:"state"`      // ACTIVE, DOWN, INIT, …
	PhysState string  `json:"phys_state"` // LinkUp, Disabled, Polling, …
	LinkLayer string  `json:"link_layer"` // InfiniBand or Ethernet (RoCE)
	Rate      string  `json:"rate"`
	RateGbps  float64 `json:"rate_gbps"`
	NetDev    string  `json:"netdev,omitempty"`
	// RoCEv2GID is the index of the port's first RoCE v2 GID, -1 when none.
	RoCEv2GID int `json:"rocev2_gid_index"`
}

// Active reports a usable port.
func (p Port) Active() bool { return p.State == "ACTIVE" && p.PhysState == "LinkUp" }

// RoCE reports an Ethernet (RoCE) port.
func (p Port) RoCE() bool { return p.LinkLayer == "Ethernet" }

// HCA is one RDMA adapter.
type HCA struct {
	Name     string `json:"name"`
	NodeGUID string `json:"node_guid"`
	FW       string `json:"fw"`
	Type     string `json:"type"`
	PCIAddr  string `json:"pci_addr"`
	NUMANode int    `json:"numa_node"`
	Ports    []Port `json:"ports"`
	// UVerbs is true when a /dev/infiniband/uverbs device exists for it.
	UVerbs bool `json:"uverbs"`
}

// Scanner reads adapters from a sysfs root and a /dev root.
type Scanner struct {
	SysRoot string // "/sys" on a host, a testdata tree in tests
	DevRoot string // "/dev"
}

// NewScanner returns a scanner of the host.
func NewScanner() *Scanner { return &Scanner{SysRoot: "/sys", DevRoot: "/dev"} }

func read(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// after strips sysfs's "4: ACTIVE" numbering.
func after(s string) string {
	if _, v, ok := strings.Cut(s, ": "); ok {
		return v
	}
	return s
}

// Scan lists the adapters. A host without any returns an empty list.
func (s *Scanner) Scan(_ context.Context) ([]HCA, error) {
	base := filepath.Join(s.SysRoot, "class", "infiniband")
	entries, err := os.ReadDir(base)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("rdma: read %s: %w", base, err)
	}
	uverbs := map[string]bool{}
	if vs, err := os.ReadDir(filepath.Join(s.SysRoot, "class", "infiniband_verbs")); err == nil {
		for _, v := range vs {
			if _, err := os.Stat(filepath.Join(s.DevRoot, "infiniband", v.Name())); err == nil {
				uverbs[read(filepath.Join(s.SysRoot, "class", "infiniband_verbs", v.Name(), "ibdev"))] = true
			}
		}
	}
	var out []HCA
	for _, e := range entries {
		dir := filepath.Join(base, e.Name())
		h := HCA{Name: e.Name(), NodeGUID: read(filepath.Join(dir, "node_guid")), FW: read(filepath.Join(dir, "fw_ver")),
			Type: read(filepath.Join(dir, "hca_type")), NUMANode: -1, UVerbs: uverbs[e.Name()]}
		for _, line := range strings.Split(read(filepath.Join(dir, "device", "uevent")), "\n") {
			if v, ok := strings.CutPrefix(line, "PCI_SLOT_NAME="); ok {
				h.PCIAddr = v
			}
		}
		if n, err := strconv.Atoi(read(filepath.Join(dir, "device", "numa_node"))); err == nil {
			h.NUMANode = n
		}
		netdevs, _ := os.ReadDir(filepath.Join(dir, "device", "net"))
		ports, _ := os.ReadDir(filepath.Join(dir, "ports"))
		for _, pe := range ports {
			num, err := strconv.Atoi(pe.Name())
			if err != nil {
				continue
			}
			pd := filepath.Join(dir, "ports", pe.Name())
			p := Port{Num: num, State: after(read(filepath.Join(pd, "state"))), PhysState: after(read(filepath.Join(pd, "phys_state"))),
				LinkLayer: read(filepath.Join(pd, "link_layer")), Rate: read(filepath.Join(pd, "rate")), RoCEv2GID: -1}
			if f := strings.Fields(p.Rate); len(f) > 0 {
				p.RateGbps, _ = strconv.ParseFloat(f[0], 64)
			}
			gids, _ := os.ReadDir(filepath.Join(pd, "gid_attrs", "types"))
			idx := make([]int, 0, len(gids))
			for _, g := range gids {
				if i, err := strconv.Atoi(g.Name()); err == nil {
					idx = append(idx, i)
				}
			}
			sort.Ints(idx)
			// NCCL needs the RoCE v2 GID of the port's IPv4 address (an
			// IPv4-mapped GID, ::ffff:a.b.c.d); the link-local v2 GID is a fallback.
			firstV2 := -1
			for _, i := range idx {
				typ := read(filepath.Join(pd, "gid_attrs", "types", strconv.Itoa(i)))
				if nd := read(filepath.Join(pd, "gid_attrs", "ndevs", strconv.Itoa(i))); nd != "" && p.NetDev == "" {
					p.NetDev = nd
				}
				if !strings.EqualFold(typ, "RoCE v2") {
					continue
				}
				if firstV2 < 0 {
					firstV2 = i
				}
				gid := strings.ReplaceAll(read(filepath.Join(pd, "gids", strconv.Itoa(i))), ":", "")
				if p.RoCEv2GID < 0 && strings.HasPrefix(gid, "00000000000000000000ffff") {
					p.RoCEv2GID = i
				}
			}
			if p.RoCEv2GID < 0 {
				p.RoCEv2GID = firstV2
			}
			if p.NetDev == "" && len(netdevs) == 1 {
				p.NetDev = netdevs[0].Name()
			}
			h.Ports = append(h.Ports, p)
		}
		sort.Slice(h.Ports, func(i, j int) bool { return h.Ports[i].Num < h.Ports[j].Num })
		out = append(out, h)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// Summary is the compact form for `shoal get nodes`: "8×400G IB", "2×200G RoCE", "none".
func Summary(hcas []HCA) string {
	count, rate, layer := 0, 0.0, ""
	for _, h := range hcas {
		for _, p := range h.Ports {
			if p.Active() {
				count++
				rate = p.RateGbps
				layer = "IB"
				if p.RoCE() {
					layer = "RoCE"
				}
			}
		}
	}
	if count == 0 {
		return "none"
	}
	return fmt.Sprintf("%d×%gG %s", count, rate, layer)
}
