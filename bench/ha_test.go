package bench

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"testing"
	"time"

	"github.com/shoalhq/shoal/coordinator/replicate"
	"github.com/shoalhq/shoal/coordinator/store"
	"github.com/shoalhq/shoal/spec"
)

// raftGroup is n coordinator stores in a Raft group on loopback.
type raftGroup struct {
	b     *testing.B
	nodes []*replicate.Node
}

func startRaftGroup(b *testing.B, n int, profile string) *raftGroup {
	b.Helper()
	var ls []net.Listener
	var servers []replicate.Server
	for i := 0; i < n; i++ {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			b.Fatal(err)
		}
		ls = append(ls, l)
		servers = append(servers, replicate.Server{ID: "c" + strconv.Itoa(i+1), Addr: l.Addr().String()})
	}
	for _, l := range ls {
		l.Close()
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	g := &raftGroup{b: b}
	for _, s := range servers {
		nd, err := replicate.Open(replicate.Config{ID: s.ID, Addr: s.Addr, Dir: filepath.Join(b.TempDir(), s.ID), Servers: servers, Profile: profile, Logger: quiet})
		if err != nil {
			b.Fatal(err)
		}
		g.nodes = append(g.nodes, nd)
	}
	return g
}

// leader waits for one and returns its index.
func (g *raftGroup) leader(skip int) int {
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		for i, nd := range g.nodes {
			if i != skip && nd != nil && nd.Leading() {
				return i
			}
		}
		time.Sleep(2 * time.Millisecond)
	}
	g.b.Fatal("no leader within 30 s")
	return -1
}

func (g *raftGroup) close() {
	for _, nd := range g.nodes {
		if nd != nil {
			nd.Close()
		}
	}
}

func haDeployment(i int) *spec.Deployment {
	return &spec.Deployment{Name: fmt.Sprintf("d%d", i), Engine: spec.Engine{Kind: spec.EngineVLLM, ServedModelName: "m"}, Replicas: spec.Replicas{Count: 1}}
}

// failover kills the leader of a fresh 3-server group and returns how long
// until a write is accepted again (by whichever server leads next).
func failover(b *testing.B, profile string) time.Duration {
	g := startRaftGroup(b, 3, profile)
	defer g.close()
	l := g.leader(-1)
	if _, err := g.nodes[l].PutDeployment(haDeployment(0), ""); err != nil {
		b.Fatal(err)
	}
	t0 := time.Now()
	g.nodes[l].Close()
	g.nodes[l] = nil
	for {
		for _, nd := range g.nodes {
			if nd == nil {
				continue
			}
			if _, err := nd.PutDeployment(haDeployment(1), ""); err == nil {
				return time.Since(t0)
			} else if !errors.As(err, new(*replicate.ErrNotLeader)) {
				b.Fatal(err)
			}
		}
		if time.Since(t0) > 30*time.Second {
			b.Fatal("no write accepted within 30 s of the leader's death")
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// quantile is the nearest-rank q-quantile (q = 1: the largest), unrounded.
func quantile(ds []time.Duration, q float64) time.Duration {
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, int(q*float64(len(s))))]
}

// BenchmarkCoordinatorFailover: a 3-server group's leader dies (its Raft
// server shut down: no leadership hand-over, the others notice the silence);
// time until a write is accepted again, over HA_RUNS runs (default 20) per
// timeout profile: lan (shoal's default) against hashicorp/raft's own
// defaults (wan).
//
//	go test -run '^$' -bench CoordinatorFailover -benchtime 1x ./bench/
func BenchmarkCoordinatorFailover(b *testing.B) {
	runs := 20
	if v, err := strconv.Atoi(os.Getenv("HA_RUNS")); err == nil && v > 0 {
		runs = v
	}
	for i := 0; i < b.N; i++ {
		if i > 0 {
			continue
		}
		fmt.Printf("\nleader kill → a write accepted again, %d runs per profile (3 servers, loopback)\n", runs)
		fmt.Printf("%-8s %8s %8s %8s %8s\n", "profile", "p50", "p90", "p99", "max")
		var lanP99 time.Duration
		for _, prof := range []string{replicate.ProfileLAN, replicate.ProfileWAN} {
			var ds []time.Duration
			for r := 0; r < runs; r++ {
				ds = append(ds, failover(b, prof))
			}
			fmt.Printf("%-8s %7.2fs %7.2fs %7.2fs %7.2fs\n", prof, quantile(ds, .5).Seconds(), quantile(ds, .9).Seconds(), quantile(ds, .99).Seconds(), quantile(ds, 1).Seconds())
			if prof == replicate.ProfileLAN {
				lanP99 = quantile(ds, .99)
			} else {
				fmt.Printf("p99 wan/lan: %.2fx\n", quantile(ds, .99).Seconds()/lanP99.Seconds())
			}
		}
	}
}

// BenchmarkCoordinatorWrites: the latency of one apply's store write at 3
// replicated servers against a single coordinator's bbolt file (the default
// deployment of shoal) and a 1-server Raft group, sequential writes,
// medians of HA_WRITES (default 400) each.
//
//	go test -run '^$' -bench CoordinatorWrites -benchtime 1x ./bench/
func BenchmarkCoordinatorWrites(b *testing.B) {
	n := 400
	if v, err := strconv.Atoi(os.Getenv("HA_WRITES")); err == nil && v > 0 {
		n = v
	}
	for i := 0; i < b.N; i++ {
		if i > 0 {
			continue
		}
		measure := func(put func(d *spec.Deployment) error) (p50, p99 time.Duration) {
			var ds []time.Duration
			for k := 0; k < n; k++ {
				t0 := time.Now()
				if err := put(haDeployment(k % 50)); err != nil {
					b.Fatal(err)
				}
				ds = append(ds, time.Since(t0))
			}
			return quantile(ds, .5), quantile(ds, .99)
		}
		st, err := store.Open(filepath.Join(b.TempDir(), "single.db"))
		if err != nil {
			b.Fatal(err)
		}
		s50, s99 := measure(func(d *spec.Deployment) error { _, err := st.PutDeployment(d, ""); return err })
		st.Close()
		row := func(name string, p50, p99 time.Duration) {
			fmt.Printf("%-26s %8.2fms %8.2fms %9.2fx\n", name, float64(p50.Microseconds())/1000, float64(p99.Microseconds())/1000, p50.Seconds()/s50.Seconds())
		}
		fmt.Printf("\napply's store write, %d sequential writes each (loopback, fsync on every write)\n", n)
		fmt.Printf("%-26s %10s %10s %10s\n", "store", "p50", "p99", "p50 vs single")
		row("single coordinator (bbolt)", s50, s99)
		for _, size := range []int{1, 3, 5} {
			g := startRaftGroup(b, size, replicate.ProfileLAN)
			l := g.nodes[g.leader(-1)]
			p50, p99 := measure(func(d *spec.Deployment) error { _, err := l.PutDeployment(d, ""); return err })
			g.close()
			row(fmt.Sprintf("raft, %d server(s)", size), p50, p99)
		}
	}
}
