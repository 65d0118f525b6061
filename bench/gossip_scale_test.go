package bench

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/shoalhq/shoal/gossip"
)

// TestGossipScale starts N shoal gossip members (the agents' own membership
// code, real UDP/TCP sockets, each on its own 127.x address), measures how
// long until every member sees all N, then crashes members one at a time
// (no leave message, as a dead host) and measures, per surviving member, how
// long until it no longer lists the victim. It prints p50/p99 and the
// suspicion window memberlist's formula predicts. Opt-in (it holds N×2
// sockets and a few cores for a minute):
//
//	SHOAL_GOSSIP_SCALE=500 SHOAL_GOSSIP_PROFILE=lan go test -run TestGossipScale -v -timeout 30m ./bench/
func TestGossipScale(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("SHOAL_GOSSIP_SCALE"))
	if n < 2 {
		t.Skip("set SHOAL_GOSSIP_SCALE=N (e.g. 500) to run the gossip scale test")
	}
	profile := os.Getenv("SHOAL_GOSSIP_PROFILE")
	if profile == "" {
		profile = "lan"
	}
	victims := 3
	var lim syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &lim); err == nil && lim.Cur < lim.Max {
		lim.Cur = lim.Max
		_ = syscall.Setrlimit(syscall.RLIMIT_NOFILE, &lim)
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError}))
	ip := func(i int) string { return fmt.Sprintf("127.1.%d.%d", i/250, i%250+1) }
	const port = 17946
	seeds := []string{ip(0) + ":" + strconv.Itoa(port), ip(1) + ":" + strconv.Itoa(port), ip(2) + ":" + strconv.Itoa(port)}
	members := make([]*gossip.Membership, n)
	cancels := make([]context.CancelFunc, n)
	ids := make([]string, n)
	var wg sync.WaitGroup
	start := time.Now()
	// Hosts do not boot in the same millisecond: members start 10 ms apart
	// (SHOAL_GOSSIP_STAGGER) and join the seeds plus two random members
	// already up, as agents with a join list of several hosts would.
	stagger := 10 * time.Millisecond
	if d, err := time.ParseDuration(os.Getenv("SHOAL_GOSSIP_STAGGER")); err == nil {
		stagger = d
	}
	for i := 0; i < n; i++ {
		join := seeds
		if i < 3 {
			join = seeds[:i]
		} else {
			join = append(append([]string(nil), seeds...), ip(3+rand.IntN(i-2))+":"+strconv.Itoa(port), ip(rand.IntN(i))+":"+strconv.Itoa(port))
		}
		time.Sleep(stagger)
		m := gossip.New(gossip.Config{Cluster: "scale", BindAddr: ip(i), BindPort: port, Join: join, Profile: profile, Logger: log},
			gossip.Tag{Kind: gossip.KindAgent, ID: fmt.Sprintf("n%04d", i), GRPC: ip(i) + ":7947", Healthy: true})
		if err := m.Start(); err != nil {
			t.Fatalf("member %d: %v", i, err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		members[i], cancels[i], ids[i] = m, cancel, fmt.Sprintf("n%04d", i)
		wg.Add(1)
		go func() { defer wg.Done(); _ = m.Run(ctx) }()
	}
	startedIn := time.Since(start)
	defer func() {
		for _, c := range cancels {
			c()
		}
		wg.Wait()
	}()

	// Convergence: every member sees every member.
	converged := map[int]time.Duration{}
	wait := 5 * time.Minute
	if d, err := time.ParseDuration(os.Getenv("SHOAL_GOSSIP_WAIT")); err == nil {
		wait = d
	}
	deadline := time.Now().Add(wait)
	for len(converged) < n && time.Now().Before(deadline) {
		for i, m := range members {
			if _, ok := converged[i]; !ok && m.Count() == n { // Count, not Members: no N×N copying in the checker
				converged[i] = time.Since(start)
			}
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(converged) < n {
		t.Fatalf("only %d of %d members converged within %v", len(converged), n, wait)
	}
	conv := make([]time.Duration, 0, n)
	for _, d := range converged {
		conv = append(conv, d)
	}
	t.Logf("N=%d profile=%s: all %d started in %v; each member saw all N after p50 %v, p99 %v, max %v",
		n, profile, n, startedIn.Round(time.Millisecond), pct(conv, 50), pct(conv, 99), pct(conv, 100))

	// Detection: crash victims one at a time, away from the seeds.
	var all []time.Duration
	for v := 0; v < victims; v++ {
		victim := n/2 + v*7
		id := ids[victim]
		members[victim].Crash()
		crashed := time.Now()
		seen := map[int]time.Duration{}
		dead := map[int]bool{victim: true}
		for len(seen) < n-1 && time.Since(crashed) < 3*time.Minute {
			for i, m := range members {
				if dead[i] {
					continue
				}
				if _, ok := seen[i]; ok {
					continue
				}
				if _, ok := m.Member(id); !ok {
					seen[i] = time.Since(crashed)
				}
			}
			time.Sleep(50 * time.Millisecond)
		}
		ds := make([]time.Duration, 0, len(seen))
		for _, d := range seen {
			ds = append(ds, d)
		}
		if len(ds) < n-1 {
			t.Errorf("victim %s: only %d of %d members removed it within 3 minutes", id, len(ds), n-1)
		}
		t.Logf("crash of %s: removed by every member after p50 %v, p99 %v, max %v", id, pct(ds, 50), pct(ds, 99), pct(ds, 100))
		all = append(all, ds...)
		members[victim] = nil
		members = append(members[:victim], members[victim+1:]...)
		cancels[victim]()
		cancels = append(cancels[:victim], cancels[victim+1:]...)
		ids = append(ids[:victim], ids[victim+1:]...)
		n--
	}
	t.Logf("detection over %d crashes × all observers: p50 %v, p99 %v", victims, pct(all, 50), pct(all, 99))
}

func pct(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	i := (len(s) - 1) * p / 100
	return s[i].Round(10 * time.Millisecond)
}
