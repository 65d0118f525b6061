package gossip

import (
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

func fullTag() Tag {
	return Tag{Cluster: "prod-cluster-eu-west", Kind: KindAgent, ID: strings.Repeat("n", 63), GRPC: "[fd00:1234:5678::abcd]:7946",
		Replica: "[fd00:1234:5678::abcd]:7947", GPUModel: "H200", GPUs: 8, Healthy: true, Deployment: strings.Repeat("d", 40),
		Group: strings.Repeat("d", 40) + "-abcdef", Epoch: 1 << 40, Rank: 63, Size: 64, HeadTerm: 1 << 40,
		Follow: strings.Repeat("n", 63), FollowTerm: 1 << 40, Engine: EngineLoading, Weights: true,
		RDMA: "16×400G RoCE", GPUMemGiB: 192,
	}
}

// slurmTag is the largest realistic tag of an agent in a Slurm job: the
// node id is NODE-jJOB, and Slurm node names are short (20 here).
func slurmTag() Tag {
	t := fullTag()
	t.ID = strings.Repeat("n", 20) + "-j123456789"
	t.Follow = t.ID
	t.SlurmJob, t.SlurmNodes, t.SlurmEnd, t.Leaving = "123456789", "gpu[0001-0016]", 1<<33, true
	t.PortBand = 10 // derived from the job on decode
	return t
}

func TestSlurmTag(t *testing.T) {
	in := slurmTag()
	b, err := in.Encode()
	require.NoError(t, err)
	out, err := DecodeTag(b)
	require.NoError(t, err)
	in.V = TagVersion
	require.Equal(t, in, out, "the port band comes from the job id")

	in.SlurmNodes = strings.Repeat("g", MaxSlurmNodes)
	b, err = in.Encode()
	require.NoError(t, err, "a long node list is left out rather than fail the tag")
	out, err = DecodeTag(b)
	require.NoError(t, err)
	require.Empty(t, out.SlurmNodes)
	require.Equal(t, "123456789", out.SlurmJob)

	bad := slurmTag()
	bad.SlurmJob = "12a"
	b, err = bad.Encode()
	require.NoError(t, err)
	_, err = DecodeTag(b)
	require.ErrorContains(t, err, `slurm job "12a" is not a job id`)
}

func TestTagRoundTripAndBound(t *testing.T) {
	in := fullTag()
	b, err := in.Encode()
	require.NoError(t, err)
	require.LessOrEqual(t, len(b), MetaMaxSize, "largest realistic tag must fit")
	out, err := DecodeTag(b)
	require.NoError(t, err)
	in.V = TagVersion
	require.Equal(t, in, out)
	require.Equal(t, "fd00:1234:5678::abcd", out.IP())

	in.ID = strings.Repeat("x", 600)
	_, err = in.Encode()
	require.ErrorContains(t, err, "512-byte")
}

func TestTagGarbageRejected(t *testing.T) {
	good, err := fullTag().Encode()
	require.NoError(t, err)
	for name, b := range map[string][]byte{
		"empty":        nil,
		"not json":     []byte("\x00\x01garbage"),
		"truncated":    good[:len(good)/2],
		"too big":      []byte(`{"v":1,"id":"` + strings.Repeat("a", 600) + `"}`),
		"no id":        []byte(`{"v":1,"t":"a","a":"127.0.0.1:1"}`),
		"old version":  []byte(`{"v":0,"t":"a","id":"x","a":"127.0.0.1:1"}`),
		"bad kind":     []byte(`{"v":1,"t":"z","id":"x","a":"127.0.0.1:1"}`),
		"bad addr":     []byte(`{"v":1,"t":"a","id":"x","a":"nohost"}`),
		"negative gpu": []byte(`{"v":1,"t":"a","id":"x","a":"127.0.0.1:1","gn":-1}`),
		"wrong types":  []byte(`{"v":1,"t":"a","id":7,"a":"127.0.0.1:1"}`),
	} {
		_, err := DecodeTag(b)
		require.ErrorIs(t, err, ErrBadTag, name)
	}
}

func FuzzDecodeTag(f *testing.F) {
	good, _ := fullTag().Encode()
	f.Add(good)
	f.Add([]byte(`{"v":1}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		tag, err := DecodeTag(b)
		if err != nil {
			return
		}
		// Anything accepted must re-encode within the bound.
		out, err := tag.Encode()
		if err == nil && len(out) > MetaMaxSize {
			t.Fatalf("re-encoded tag is %d bytes", len(out))
		}
	})
}
