package sim

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"sync"
	"time"
)

// The rendezvous stands in for torch.distributed's TCP store on the master
// address: rank 0 listens, the other ranks connect and say who they are and
// which arguments they run with. Like NCCL, a rank whose arguments differ
// makes the group hang rather than fail (vllm PR #44718), and a rank that
// goes away later breaks the group at its next collective.
type rdvMsg struct {
	Rank int    `json:"rank"`
	Sig  string `json:"sig"` // a digest of the arguments that must match
}

// rendezvousMaster waits for ranks 1..nnodes-1. It returns a channel that
// yields a rank's address when that rank's connection drops, and false when
// the ranks disagree about the arguments (the caller then hangs, as NCCL does).
//
// With fanout, the loss of one member closes every other member's
// connection: a DP coordinator's ranks all learn that a peer is gone.
func rendezvousMaster(ctx context.Context, addr string, nnodes int, sig string, log io.Writer, fanout bool) (<-chan string, bool, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, false, fmt.Errorf("RuntimeError: The server socket has failed to listen on %s: %w", addr, err)
	}
	type member struct {
		conn net.Conn
		rank int
	}
	joined := make(chan member)
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				var m rdvMsg
				_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
				if err := json.NewDecoder(bufio.NewReader(c)).Decode(&m); err != nil {
					c.Close()
					return
				}
				_ = c.SetReadDeadline(time.Time{})
				if m.Sig != sig {
					m.Rank = -1 // mismatched arguments
				}
				select {
				case joined <- member{c, m.Rank}:
				case <-ctx.Done():
					c.Close()
				}
			}()
		}
	}()
	go func() { <-ctx.Done(); ln.Close() }()
	members := map[int]net.Conn{}
	agree := true
	for len(members) < nnodes-1 {
		select {
		case m := <-joined:
			if m.rank < 0 {
				agree = false
				fmt.Fprintf(log, "WARNING a rank joined with different arguments; collectives will not match\n")
				continue
			}
			members[m.rank] = m.conn
			fmt.Fprintf(log, "INFO rank %d joined from %s (%d/%d)\n", m.rank, m.conn.RemoteAddr(), len(members)+1, nnodes)
		case <-ctx.Done():
			return nil, false, ctx.Err()
		}
	}
	if !agree {
		return nil, false, nil
	}
	lost := make(chan string, nnodes)
	var once sync.Once
	go func() {
		// The process ending closes its sockets (in-process runs, too).
		<-ctx.Done()
		for _, o := range members {
			o.Close()
		}
	}()
	for _, c := range members {
		go func(c net.Conn) {
			_, _ = io.Copy(io.Discard, c)
			if fanout {
				once.Do(func() {
					for _, o := range members {
						o.Close()
					}
				})
			}
			host, _, _ := net.SplitHostPort(c.RemoteAddr().String())
			lost <- host
		}(c)
	}
	return lost, true, nil
}

// rendezvousJoin connects a non-zero rank to the master, retrying until it
// answers or ctx ends. The connection stays open: its loss is how the master
// learns the rank is gone. Closing the returned conn leaves the group.
func rendezvousJoin(ctx context.Context, addr string, rank int, sig string) (net.Conn, error) {
	for {
		c, err := net.DialTimeout("tcp", addr, 2*time.Second)
		if err == nil {
			if err := json.NewEncoder(c).Encode(rdvMsg{Rank: rank, Sig: sig}); err != nil {
				c.Close()
				return nil, err
			}
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}
