package replicav1

import (
	"testing"

	"github.com/shoalhq/shoal/internal/kvevents"
	"github.com/stretchr/testify/require"
)

func TestEventsRoundTrip(t *testing.T) {
	evs := []kvevents.Event{{Kind: kvevents.Stored, Hashes: []uint64{1, 2}}, {Kind: kvevents.Removed, Hashes: []uint64{1}}, {Kind: kvevents.Cleared}}
	require.Equal(t, evs, EventsFromProto(EventsToProto(evs)))
	require.Empty(t, EventsFromProto([]*KVEvent{{Kind: KVEvent_KIND_UNSPECIFIED, Hashes: []uint64{9}}}), "an unknown kind is skipped")
}
