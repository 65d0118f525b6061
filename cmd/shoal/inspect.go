package main

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sort"
	"strings"
	"time"

	"github.com/shoalhq/shoal/agent"
	"github.com/shoalhq/shoal/gpu"
	"github.com/shoalhq/shoal/rdma"
	"github.com/urfave/cli/v2"
)

func inspectCommand() *cli.Command {
	return &cli.Command{
		Name:  "inspect",
		Usage: "print this host's GPUs, RDMA adapters, NCCL settings and preflight verdict, without joining a cluster",
		Flags: []cli.Flag{
			&cli.StringFlag{Name: "gpu-backend", EnvVars: []string{"SHOAL_GPU_BACKEND"}, Usage: "nvml (default), none, or mock:h200x8"},
			&cli.StringFlag{Name: "address", EnvVars: []string{"SHOAL_ADDRESS"}, Usage: "this host's IP, to find the NCCL socket interface"},
			&cli.StringFlag{Name: "sysfs", Value: "/sys", Usage: "sysfs root (for RDMA discovery)"},
			&cli.DurationFlag{Name: "watch", Usage: "also watch GPU Xid/ECC events this long and report them"},
			outputFlag,
		},
		Action: func(c *cli.Context) error {
			ins, err := gpu.New(c.String("gpu-backend"))
			if err != nil {
				return err
			}
			hw, err := agent.InspectHost(c.Context, ins, &rdma.Scanner{SysRoot: c.String("sysfs"), DevRoot: "/dev"}, c.String("address"), nil)
			if err != nil {
				return err
			}
			if d := c.Duration("watch"); d > 0 {
				watchFor(c, ins, d, hw)
			}
			problems := verdict(hw)
			if c.String("output") == "json" {
				b, _ := json.MarshalIndent(struct {
					*agent.HostInventory
					Ready    bool     `json:"ready"`
					Problems []string `json:"problems,omitempty"`
				}{hw, len(problems) == 0, problems}, "", "  ")
				fmt.Fprintln(c.App.Writer, string(b))
			} else {
				printInventory(c.App.Writer, hw, problems)
			}
			if len(problems) > 0 {
				return cli.Exit("", 1)
			}
			return nil
		},
	}
}

// verdict lists what keeps this host from serving.
func verdict(hw *agent.HostInventory) []string {
	var out []string
	if hw.GPU == nil || len(hw.GPU.Devices) == 0 {
		out = append(out, "no GPUs: this host cannot serve GPU engines (is the NVIDIA driver loaded? `nvidia-smi`; or --gpu-backend)")
	} else {
		for _, d := range hw.GPU.Devices {
			for _, r := range d.Reasons {
				out = append(out, fmt.Sprintf("GPU %d: %s", d.Index, r))
			}
		}
	}
	for _, c := range hw.Preflight {
		if !c.OK {
			out = append(out, c.Name+": "+c.Detail)
		}
	}
	return out
}

func printInventory(w io.Writer, hw *agent.HostInventory, problems []string) {
	g := hw.GPU
	if len(g.Devices) == 0 {
		fmt.Fprintln(w, "GPUs: none (no NVIDIA driver, or no GPU)")
	} else {
		fmt.Fprintf(w, "GPUs: %d × %s   driver %s, CUDA %s, NVML %s\n", len(g.Devices), g.Devices[0].Name, g.DriverVersion, g.CUDAVersion, g.NVMLVersion)
		var rows [][]string
		for _, d := range g.Devices {
			up := 0
			for _, l := range d.NVLinks {
				if l {
					up++
				}
			}
			health := "ok"
			if !d.Healthy {
				health = strings.Join(d.Reasons, "; ")
			}
			rows = append(rows, []string{fmt.Sprint(d.Index), d.UUID, fmt.Sprintf("%d/%d GiB", d.MemoryUsedMiB/1024, d.MemoryMiB/1024), dash(d.ComputeCapability),
				dash(d.PCIBusID), fmt.Sprint(d.NUMANode), fmt.Sprintf("%d/%d", up, len(d.NVLinks)),
				fmt.Sprintf("%d/%d", d.ECCVolatileUncorrected, d.ECCAggregateUncorrected), fmt.Sprintf("%d°C", d.TemperatureC),
				fmt.Sprintf("%.0fW", d.PowerW), fmt.Sprint(d.Processes), health})
		}
		table(w, "IDX\tUUID\tMEMORY\tCC\tPCI\tNUMA\tNVLINK\tECC V/A\tTEMP\tPOWER\tPROCS\tHEALTH", rows)
		if len(g.Devices[0].Unsupported) > 0 {
			fmt.Fprintf(w, "not supported by this driver/device: %s\n", strings.Join(g.Devices[0].Unsupported, ", "))
		}
	}
	fmt.Fprintf(w, "\nRDMA: %s\n", hw.RDMASum)
	if len(hw.RDMA) > 0 {
		var rows [][]string
		for _, h := range hw.RDMA {
			for _, p := range h.Ports {
				rows = append(rows, []string{h.Name, fmt.Sprint(p.Num), p.State + "/" + p.PhysState, p.LinkLayer, p.Rate, dash(p.NetDev),
					fmt.Sprint(p.RoCEv2GID), h.PCIAddr, fmt.Sprint(h.NUMANode)})
			}
		}
		table(w, "HCA\tPORT\tSTATE\tLINK\tRATE\tNETDEV\tROCEV2 GID\tPCI\tNUMA", rows)
	}
	for _, a := range hw.Affinity {
		fmt.Fprintf(w, "GPU %d ↔ %s (%s)\n", a.GPU, a.HCA, a.Relation)
	}
	keys := make([]string, 0, len(hw.NCCLEnv))
	for k := range hw.NCCLEnv {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	fmt.Fprintln(w, "\nEngine environment (NCCL/GLOO):")
	for _, k := range keys {
		fmt.Fprintf(w, "  %s=%s\n", k, hw.NCCLEnv[k])
	}
	fmt.Fprintln(w, "\nPreflight:")
	for _, c := range hw.Preflight {
		mark := "ok  "
		if !c.OK {
			mark = "FAIL"
		}
		fmt.Fprintf(w, "  %s %-9s %s\n", mark, c.Name, c.Detail)
	}
	if len(problems) == 0 {
		fmt.Fprintln(w, "\nverdict: ready")
	} else {
		fmt.Fprintf(w, "\nverdict: NOT ready:\n  - %s\n", strings.Join(problems, "\n  - "))
	}
}

// watchFor runs the GPU event watch for d and records what it saw.
func watchFor(c *cli.Context, ins gpu.Inspector, d time.Duration, hw *agent.HostInventory) {
	w, ok := ins.(interface {
		gpu.Watcher
		Registered() int
	})
	if !ok {
		fmt.Fprintln(c.App.ErrWriter, "event watch: this backend has no events")
		return
	}
	ctx, cancel := context.WithTimeout(c.Context, d)
	defer cancel()
	events := make(chan gpu.Event, 64)
	done := make(chan error, 1)
	go func() { done <- w.Watch(ctx, events) }()
	var err error
	for err == nil {
		select {
		case ev := <-events:
			hw.Events = append(hw.Events, ev)
		case err = <-done:
			if err == nil {
				err = context.Canceled // stopped as asked
			}
		}
	}
	if err != context.Canceled {
		fmt.Fprintf(c.App.ErrWriter, "event watch: %v\n", err)
		return
	}
	fmt.Fprintf(c.App.ErrWriter, "event watch: registered Xid/ECC events on %d GPU(s), watched %v, %d event(s), stopped cleanly\n",
		w.Registered(), d, len(hw.Events))
}
