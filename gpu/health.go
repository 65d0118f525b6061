package gpu

import (
	"context"
	"fmt"

	"github.com/NVIDIA/go-nvml/pkg/nvml"
)

// Event is a GPU health event from NVML.
type Event struct {
	Index int    `json:"index"`
	UUID  string `json:"uuid"`
	// XID is the Xid code for Xid events, 0 for ECC events.
	XID uint64 `json:"xid"`
	// Critical is false for application errors that say nothing about the hardware.
	Critical bool   `json:"critical"`
	Reason   string `json:"reason"`
}

// applicationXIDs are errors caused by the program on the GPU, not the GPU:
// the same list NVIDIA's k8s-device-plugin skips (internal/rm/health.go).
var applicationXIDs = map[uint64]string{
	13:  "graphics engine exception (application)",
	31:  "GPU memory page fault (application)",
	43:  "GPU stopped processing (application)",
	45:  "preemptive cleanup after an error (application)",
	68:  "NVDEC0 exception (application)",
	109: "context switch timeout (application)",
}

// Classify turns an NVML event into an Event (index and UUID left to the caller).
func Classify(eventType, data uint64) Event {
	switch {
	case eventType&nvml.EventTypeDoubleBitEccError != 0:
		return Event{Critical: true, Reason: "double-bit ECC error"}
	case eventType&nvml.EventTypeXidCriticalError != 0:
		if why, ok := applicationXIDs[data]; ok {
			return Event{XID: data, Reason: fmt.Sprintf("XID %d: %s", data, why)}
		}
		return Event{XID: data, Critical: true, Reason: fmt.Sprintf("XID %d: hardware or driver fault", data)}
	}
	return Event{Reason: fmt.Sprintf("NVML event type %#x", eventType)}
}

// Watch registers for Xid and double-bit ECC events on every device and sends
// them to out until ctx ends. A host without a driver, or a driver without
// event support, returns at once with the reason.
func (n *NVML) Watch(ctx context.Context, out chan<- Event) error {
	if ret := n.lib.Init(); ret != nvml.SUCCESS {
		return fmt.Errorf("nvml init: %s", n.lib.ErrorString(ret))
	}
	defer n.lib.Shutdown()
	set, ret := n.lib.EventSetCreate()
	if ret != nvml.SUCCESS {
		return fmt.Errorf("nvml event set: %s", n.lib.ErrorString(ret))
	}
	defer set.Free()
	count, ret := n.lib.DeviceGetCount()
	if ret != nvml.SUCCESS {
		return fmt.Errorf("nvml device count: %s", n.lib.ErrorString(ret))
	}
	uuids := map[int]string{}
	registered := 0
	for i := 0; i < count; i++ {
		dev, ret := n.lib.DeviceGetHandleByIndex(i)
		if ret != nvml.SUCCESS {
			continue
		}
		uuids[i], _ = dev.GetUUID()
		if dev.RegisterEvents(nvml.EventTypeXidCriticalError|nvml.EventTypeDoubleBitEccError, set) == nvml.SUCCESS {
			registered++
		}
	}
	if registered == 0 && count > 0 {
		return fmt.Errorf("nvml: no device accepts event registration")
	}
	n.registered.Store(int32(registered))
	for ctx.Err() == nil {
		data, ret := set.Wait(500)
		if ret == nvml.ERROR_TIMEOUT || ret != nvml.SUCCESS {
			continue
		}
		ev := Classify(data.EventType, data.EventData)
		ev.Index = -1
		if data.Device != nil {
			if idx, r := data.Device.GetIndex(); r == nvml.SUCCESS {
				ev.Index, ev.UUID = idx, uuids[idx]
			}
		}
		select {
		case out <- ev:
		case <-ctx.Done():
		}
	}
	return nil
}

// Registered is how many devices the running Watch registered events on.
func (n *NVML) Registered() int { return int(n.registered.Load()) }

// Watcher is implemented by inspectors that can report health events.
type Watcher interface {
	Watch(ctx context.Context, out chan<- Event) error
}

var _ Watcher = (*NVML)(nil)
