// Package gputest builds NVML fakes on go-nvml's DGX H200 mock: every query
// the agent makes is answered (healthy defaults), any one can be overridden
// per device, and Xid / ECC events can be injected, from the test or from a
// file (for agents running as separate processes).
package gputest

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/dgxh200"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/gpus"
	"github.com/NVIDIA/go-nvml/pkg/nvml/mock/server"
)

// Fake is an nvml.Interface with n H200 GPUs.
type Fake struct {
	*server.Server
	events chan nvml.EventData

	mu       sync.Mutex
	file     string // guarded by mu
	fileRead int64  // guarded by mu
}

// NVLinksPerGPU is the H200 SXM's NVLink count.
const NVLinksPerGPU = 18

// NewH200 returns a healthy host with n H200 SXM GPUs.
func NewH200(n int) *Fake {
	f := &Fake{Server: dgxh200.NewWithGPUs(gpus.Multiple(n, gpus.H200_SXM5_141GB)...), events: make(chan nvml.EventData, 64)}
	for i, d := range f.Devices {
		dev := d.(*server.Device)
		i := i
		dev.GetNumaNodeIdFunc = func() (int, nvml.Return) { return i / 4, nvml.SUCCESS }
		dev.GetNvLinkStateFunc = func(l int) (nvml.EnableState, nvml.Return) {
			if l >= NVLinksPerGPU {
				return 0, nvml.ERROR_INVALID_ARGUMENT
			}
			return nvml.FEATURE_ENABLED, nvml.SUCCESS
		}
		dev.GetEccModeFunc = func() (nvml.EnableState, nvml.EnableState, nvml.Return) {
			return nvml.FEATURE_ENABLED, nvml.FEATURE_ENABLED, nvml.SUCCESS
		}
		dev.GetTotalEccErrorsFunc = func(nvml.MemoryErrorType, nvml.EccCounterType) (uint64, nvml.Return) { return 0, nvml.SUCCESS }
		dev.GetRemappedRowsFunc = func() (int, int, bool, bool, nvml.Return) { return 0, 0, false, false, nvml.SUCCESS }
		dev.GetRetiredPagesPendingStatusFunc = func() (nvml.EnableState, nvml.Return) { return nvml.FEATURE_DISABLED, nvml.SUCCESS }
		dev.GetComputeRunningProcessesFunc = func() ([]nvml.ProcessInfo, nvml.Return) { return nil, nvml.SUCCESS }
		dev.GetTemperatureFunc = func(nvml.TemperatureSensors) (uint32, nvml.Return) { return 34, nvml.SUCCESS }
		dev.GetPowerUsageFunc = func() (uint32, nvml.Return) { return 98_000, nvml.SUCCESS }
		dev.RegisterEventsFunc = func(uint64, nvml.EventSet) nvml.Return { return nvml.SUCCESS }
		pciID := dev.Config.PciDeviceId
		dev.GetPciInfoFunc = func() (nvml.PciInfo, nvml.Return) {
			p := nvml.PciInfo{PciDeviceId: pciID}
			for j := 0; j < len(dev.PciBusID) && j < len(p.BusId)-1; j++ {
				p.BusId[j] = int8(dev.PciBusID[j])
			}
			return p, nvml.SUCCESS
		}
	}
	f.EventSetCreateFunc = func() (nvml.EventSet, nvml.Return) {
		return &mock.EventSet{
			WaitFunc: f.wait,
			FreeFunc: func() nvml.Return { return nvml.SUCCESS },
		}, nvml.SUCCESS
	}
	return f
}

// Device returns GPU i for per-call overrides (set its …Func fields).
func (f *Fake) Device(i int) *server.Device { return f.Devices[i].(*server.Device) }

// InjectXID delivers an Xid event for GPU i.
func (f *Fake) InjectXID(i int, xid uint64) {
	f.events <- nvml.EventData{Device: f.Devices[i], EventType: nvml.EventTypeXidCriticalError, EventData: xid}
}

// InjectDoubleBitECC delivers a double-bit ECC event for GPU i.
func (f *Fake) InjectDoubleBitECC(i int) {
	f.events <- nvml.EventData{Device: f.Devices[i], EventType: nvml.EventTypeDoubleBitEccError}
}

// FaultsFile makes Wait also read faults appended to path ("xid GPU CODE",
// "ecc GPU"), so a test can inject into an agent running as another process.
func (f *Fake) FaultsFile(path string) {
	f.mu.Lock()
	f.file = path
	f.mu.Unlock()
}

func (f *Fake) wait(timeoutMs uint32) (nvml.EventData, nvml.Return) {
	deadline := time.After(time.Duration(timeoutMs) * time.Millisecond)
	// The faults file is looked at (a stat; read only when it grew) a few
	// times a second: an injected fault is seen within 250 ms, and an idle
	// simulated host does not cost more than a real one.
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	for {
		select {
		case e := <-f.events:
			return e, nvml.SUCCESS
		case <-deadline:
			return nvml.EventData{}, nvml.ERROR_TIMEOUT
		case <-tick.C:
			f.readFile()
		}
	}
}

// readFile queues faults appended to the faults file since the last read.
func (f *Fake) readFile() {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.file == "" {
		return
	}
	if st, err := os.Stat(f.file); err != nil || st.Size() <= f.fileRead {
		return
	}
	fh, err := os.Open(f.file)
	if err != nil {
		return
	}
	defer fh.Close()
	if _, err := fh.Seek(f.fileRead, 0); err != nil {
		return
	}
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		line := sc.Text()
		f.fileRead += int64(len(line)) + 1
		fields := strings.Fields(line)
		if len(fields) < 2 {
			continue
		}
		i, err := strconv.Atoi(fields[1])
		if err != nil || i < 0 || i >= len(f.Devices) {
			continue
		}
		switch {
		case fields[0] == "xid" && len(fields) == 3:
			if code, err := strconv.ParseUint(fields[2], 10, 64); err == nil {
				go f.InjectXID(i, code)
			}
		case fields[0] == "ecc":
			go f.InjectDoubleBitECC(i)
		}
	}
}
