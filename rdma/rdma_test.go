package rdma

import (
	"context"
	"fmt"
	"net"
	"testing"

	"github.com/stretchr/testify/require"
)

// No RDMA hardware exists on the machines these tests run on: the trees under
// testdata/ (made by testdata/gen.sh) model real mlx5 layouts.
func scan(t *testing.T, tree string) []HCA {
	t.Helper()
	hcas, err := (&Scanner{SysRoot: "testdata/" + tree + "/sys", DevRoot: "testdata/" + tree + "/dev"}).Scan(context.Background())
	require.NoError(t, err)
	return hcas
}

func TestScanIB8(t *testing.T) {
	hcas := scan(t, "ib8")
	require.Len(t, hcas, 8)
	h := hcas[5]
	require.Equal(t, "mlx5_5", h.Name)
	require.Equal(t, "0000:c5:00.0", h.PCIAddr)
	require.Equal(t, 1, h.NUMANode)
	require.Equal(t, "28.39.1002", h.FW)
	require.True(t, h.UVerbs)
	require.Len(t, h.Ports, 1)
	p := h.Ports[0]
	require.True(t, p.Active())
	require.False(t, p.RoCE())
	require.Equal(t, 400.0, p.RateGbps)
	require.Equal(t, "ibp5s0", p.NetDev)
	require.Equal(t, -1, p.RoCEv2GID)
	require.Equal(t, "8×400G IB", Summary(hcas))

	env := NCCLEnv(hcas, "eth0", nil)
	require.Equal(t, "mlx5_0:1,mlx5_1:1,mlx5_2:1,mlx5_3:1,mlx5_4:1,mlx5_5:1,mlx5_6:1,mlx5_7:1", env["NCCL_IB_HCA"])
	require.Equal(t, "0", env["NCCL_IB_DISABLE"])
	require.Equal(t, "eth0", env["NCCL_SOCKET_IFNAME"])
	require.Equal(t, "eth0", env["GLOO_SOCKET_IFNAME"])
	_, hasGID := env["NCCL_IB_GID_INDEX"]
	require.False(t, hasGID, "no GID index for InfiniBand")
	// The spec wins.
	env = NCCLEnv(hcas, "eth0", map[string]string{"NCCL_IB_HCA": "mlx5_1:1"})
	require.Equal(t, "mlx5_1:1", env["NCCL_IB_HCA"])
}

func TestScanRoCE(t *testing.T) {
	hcas := scan(t, "roce2")
	require.Len(t, hcas, 2)
	require.True(t, hcas[0].Ports[0].RoCE())
	require.Equal(t, 3, hcas[0].Ports[0].RoCEv2GID, "the IPv4 RoCE v2 GID, not the link-local one")
	require.Equal(t, "ens0f0", hcas[0].Ports[0].NetDev)
	require.False(t, hcas[1].Ports[0].Active(), "mlx5_1 is down")
	require.Equal(t, "1×200G RoCE", Summary(hcas))
	env := NCCLEnv(hcas, "ens0f0", nil)
	require.Equal(t, "mlx5_0:1", env["NCCL_IB_HCA"], "active ports only")
	require.Equal(t, "3", env["NCCL_IB_GID_INDEX"])
}

func TestNoHCA(t *testing.T) {
	hcas := scan(t, "none")
	require.Empty(t, hcas)
	require.Equal(t, "none", Summary(hcas))
	env := NCCLEnv(hcas, "eth0", nil)
	require.Equal(t, "1", env["NCCL_IB_DISABLE"])
	_, ok := env["NCCL_IB_HCA"]
	require.False(t, ok)
	hcas, err := (&Scanner{SysRoot: t.TempDir() + "/missing"}).Scan(context.Background())
	require.NoError(t, err, "no sysfs class is no HCA, not an error")
	require.Empty(t, hcas)
}

func TestGPUAffinity(t *testing.T) {
	hcas := scan(t, "ib8")
	var pci []string
	var numa []int
	for i := 0; i < 8; i++ {
		pci = append(pci, fmt.Sprintf("0000:d%d:00.0", i))
		numa = append(numa, i/4)
	}
	aff := GPUAffinity("testdata/ib8/sys", pci, numa, hcas)
	require.Len(t, aff, 8)
	for i, a := range aff {
		require.Equal(t, fmt.Sprintf("mlx5_%d", i), a.HCA)
		require.Equal(t, "PCIe switch", a.Relation)
	}
	// NVML's 8-digit domain form resolves the same.
	aff = GPUAffinity("testdata/ib8/sys", []string{"00000000:D3:00.0"}, []int{0}, hcas)
	require.Equal(t, "mlx5_3", aff[0].HCA)
	require.Equal(t, "PCIe switch", aff[0].Relation)
	// Unknown PCI paths: the NUMA node decides.
	aff = GPUAffinity("testdata/ib8/sys", []string{"0000:ee:00.0"}, []int{1}, hcas)
	require.Equal(t, "NUMA node", aff[0].Relation)
	require.Equal(t, "mlx5_4", aff[0].HCA)
}

func TestIfaceFor(t *testing.T) {
	list := func() ([]net.Interface, func(net.Interface) ([]net.Addr, error), error) {
		return []net.Interface{{Name: "lo"}, {Name: "eth1"}}, func(i net.Interface) ([]net.Addr, error) {
			if i.Name == "eth1" {
				return []net.Addr{&net.IPNet{IP: net.ParseIP("10.1.2.3"), Mask: net.CIDRMask(24, 32)}}, nil
			}
			return []net.Addr{&net.IPNet{IP: net.ParseIP("127.0.0.1"), Mask: net.CIDRMask(8, 32)}}, nil
		}, nil
	}
	name, err := IfaceFor("10.1.2.3", list)
	require.NoError(t, err)
	require.Equal(t, "eth1", name)
	_, err = IfaceFor("10.9.9.9", list)
	require.Error(t, err)
	_, err = IfaceFor("nope", list)
	require.Error(t, err)
	name, err = IfaceFor("127.0.0.1", HostInterfaces)
	require.NoError(t, err, "the real host path works too")
	require.NotEmpty(t, name)
}

func TestPreflight(t *testing.T) {
	checks := Preflight(true)
	names := map[string]bool{}
	for _, c := range checks {
		names[c.Name] = true
		require.NotEmpty(t, c.Detail)
	}
	require.True(t, names["memlock"] && names["/dev/shm"] && names["IPC_LOCK"], "%v", checks)
}
