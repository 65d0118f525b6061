package sim

import (
	"net"
	"sync"
)

// sideChannel is a KV connector's listener (NIXL's side channel, SGLang's
// bootstrap server): it serves each connection on its own goroutine, and
// closing it closes every connection still open, as a process's sockets
// die with it.
type sideChannel struct {
	ln     net.Listener
	mu     sync.Mutex
	conns  map[net.Conn]bool // guarded by mu
	closed bool              // guarded by mu
}

func listenSide(addr string) (*sideChannel, error) {
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	return &sideChannel{ln: ln, conns: map[net.Conn]bool{}}, nil
}

// serve accepts until close, handing each connection to handle (and
// closing it after).
func (s *sideChannel) serve(handle func(net.Conn)) {
	for {
		c, err := s.ln.Accept()
		if err != nil {
			return
		}
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			c.Close()
			return
		}
		s.conns[c] = true
		s.mu.Unlock()
		go func() {
			defer func() {
				s.mu.Lock()
				delete(s.conns, c)
				s.mu.Unlock()
				c.Close()
			}()
			handle(c)
		}()
	}
}

func (s *sideChannel) close() {
	s.ln.Close()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closed = true
	for c := range s.conns {
		c.Close()
	}
}

// open is how many connections are being served (tests).
func (s *sideChannel) open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// holdPrompt takes a reference on the cached blocks of a finished
// request's prompt (hashes), so that they stay for a decode engine, and
// returns them.
func (e *Engine) holdPrompt(hashes []uint64) []int {
	e.mu.Lock()
	defer e.mu.Unlock()
	ids := e.kv.lookup(hashes)
	for _, id := range ids {
		e.kv.acquire(id)
	}
	e.m.setKV(e.kv.usage())
	return ids
}

// releaseHold drops holdPrompt's references.
func (e *Engine) releaseHold(ids []int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, id := range ids {
		e.kv.release(id)
	}
	e.m.setKV(e.kv.usage())
}
