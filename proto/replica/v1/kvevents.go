package replicav1

import "github.com/shoalhq/shoal/internal/kvevents"

// Hand-written, beside the generated code: the one mapping between the
// engines' KV events and the KVEvents stream, used by heads and routers.

var kindToProto = map[kvevents.Kind]KVEvent_Kind{
	kvevents.Stored: KVEvent_STORED, kvevents.Removed: KVEvent_REMOVED, kvevents.Cleared: KVEvent_CLEARED}

// EventsToProto is a batch's events as a KVEvents message carries them.
func EventsToProto(evs []kvevents.Event) []*KVEvent {
	out := make([]*KVEvent, 0, len(evs))
	for _, e := range evs {
		if k, ok := kindToProto[e.Kind]; ok {
			out = append(out, &KVEvent{Kind: k, Hashes: e.Hashes})
		}
	}
	return out
}

// EventsFromProto reads them back; kinds it does not know are skipped.
func EventsFromProto(evs []*KVEvent) []kvevents.Event {
	out := make([]kvevents.Event, 0, len(evs))
	for _, e := range evs {
		for k, p := range kindToProto {
			if p == e.Kind {
				out = append(out, kvevents.Event{Kind: k, Hashes: e.Hashes})
			}
		}
	}
	return out
}
