package kvevents

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/go-zeromq/zmq4"
	"github.com/go-zeromq/zmq4/transport"
)

// watchedTCP is TCP for sockets that dial: each connection it makes closes
// the channel in its context (watchKey) when it breaks, so that its owner can
// dial afresh. go-zeromq's own WithAutomaticReconnect races with Close and,
// on a listening socket, dials its own address; this replaces it.
//
// For sockets that listen, every connection it accepts is closed when the
// socket's context ends. go-zeromq's Close closes the connections it has,
// then the listener: one accepted in between (an engine redialling at once
// as the old subscriber goes) was never closed, and the engine, connected
// to nobody who reads, never redialled the next subscriber.
const watchedTCP = "shoal-watched-tcp"

type watchKey struct{}

type watched struct{}

func (watched) Dial(ctx context.Context, d transport.Dialer, addr string) (net.Conn, error) {
	c, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	died, _ := ctx.Value(watchKey{}).(func())
	return &watchedConn{Conn: c, died: died}, nil
}

func (watched) Listen(ctx context.Context, addr string) (net.Listener, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, err
	}
	tl := &trackingListener{Listener: l, ctx: ctx, conns: map[*trackedConn]bool{}}
	go func() {
		<-ctx.Done()
		_ = l.Close()
		tl.mu.Lock()
		conns := tl.conns
		tl.conns = nil
		tl.mu.Unlock()
		for c := range conns {
			_ = c.Conn.Close() // the raw connection: its Close would take mu
		}
	}()
	return tl, nil
}

// trackingListener closes what it accepted once its socket's context ends,
// and anything it accepts after.
type trackingListener struct {
	net.Listener
	ctx   context.Context
	mu    sync.Mutex
	conns map[*trackedConn]bool // guarded by mu; nil once the context ended
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.conns == nil || l.ctx.Err() != nil {
		_ = c.Close()
		return nil, net.ErrClosed
	}
	tc := &trackedConn{Conn: c, l: l}
	l.conns[tc] = true
	return tc, nil
}

type trackedConn struct {
	net.Conn
	l *trackingListener
}

func (c *trackedConn) Close() error {
	c.l.mu.Lock()
	delete(c.l.conns, c) // a no-op on the nil map once the context ended
	c.l.mu.Unlock()
	return c.Conn.Close()
}

func (watched) Addr(ep string) (string, error) { return transport.New("tcp").Addr(ep) }

type watchedConn struct {
	net.Conn
	died func()
	once sync.Once
}

func (c *watchedConn) broke() {
	if c.died != nil {
		c.once.Do(c.died)
	}
}

func (c *watchedConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil {
		c.broke()
	}
	return n, err
}

func (c *watchedConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if err != nil {
		c.broke()
	}
	return n, err
}

func (c *watchedConn) Close() error { c.broke(); return c.Conn.Close() }

func init() {
	if err := zmq4.RegisterTransport(watchedTCP, watched{}); err != nil {
		panic(err)
	}
}

// dialWatched connects a new socket of kind to a tcp:// endpoint, retrying
// until it connects or ctx ends; the returned channel closes when that
// connection breaks. The caller closes the socket.
func dialWatched(ctx context.Context, endpoint string, kind func(context.Context, ...zmq4.Option) zmq4.Socket) (zmq4.Socket, <-chan struct{}, error) {
	rest, ok := strings.CutPrefix(endpoint, "tcp://")
	if !ok {
		return nil, nil, fmt.Errorf("kv events: %s: only tcp:// endpoints are dialled", endpoint)
	}
	died := make(chan struct{})
	var once sync.Once
	ctx = context.WithValue(ctx, watchKey{}, func() { once.Do(func() { close(died) }) })
	s := kind(ctx, zmq4.WithDialerRetry(100*time.Millisecond), zmq4.WithDialerMaxRetries(-1))
	if err := s.Dial(watchedTCP + "://" + strings.Replace(rest, "*", "127.0.0.1", 1)); err != nil {
		_ = s.Close()
		return nil, nil, err
	}
	return s, died, nil
}

// listenBusyFor is how long a subscriber waits for its port to be free.
const listenBusyFor = 30 * time.Second

// listenSub opens a SUB listening on endpoint. A port in use is waited
// for: the engine, redialling a subscriber that just went, can hold it for
// a moment (a TCP self-connect to a port in the ephemeral range), as can
// the subscriber of a run that is stopping.
func listenSub(ctx context.Context, endpoint string) (zmq4.Socket, error) {
	deadline := time.Now().Add(listenBusyFor)
	for {
		sub := zmq4.NewSub(ctx)
		err := sub.Listen(watchedEndpoint(endpoint))
		if err == nil {
			return sub, nil
		}
		_ = sub.Close()
		if !errors.Is(err, syscall.EADDRINUSE) || time.Now().After(deadline) {
			return nil, err
		}
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// watchedEndpoint is a tcp:// endpoint on the watched transport (others as
// they are).
func watchedEndpoint(ep string) string {
	if rest, ok := strings.CutPrefix(ep, "tcp://"); ok {
		return watchedTCP + "://" + rest
	}
	return ep
}

// endSeq is the replay stream's end marker: -1 as 8 bytes, big-endian.
var endSeq = [8]byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}

// binds says whether vLLM binds an endpoint rather than connecting to it:
// its ZmqEventPublisher binds when the address has "*" or "::" or is ipc://
// or inproc://, and connects otherwise. The subscriber does the opposite.
func binds(endpoint string) bool {
	return strings.Contains(endpoint, "*") || strings.Contains(endpoint, "::") ||
		strings.HasPrefix(endpoint, "ipc://") || strings.HasPrefix(endpoint, "inproc://")
}

// Publisher is the engine side, as vLLM's ZmqEventPublisher behaves: each
// batch goes out as [topic, seq (8 bytes, big-endian, from 0), msgpack
// payload] on a PUB socket, and the last bufferSteps batches are kept for
// replay on a ROUTER socket: a request [identity, "", start seq] is answered
// with every kept batch from start on, then [-1, ""]. The simulator uses it.
type Publisher struct {
	topic []byte
	max   int
	drop  float64 // fraction of batches not sent (a PUB past its high-water mark drops silently)

	ctx    context.Context
	cancel context.CancelFunc
	replay zmq4.Socket
	wg     sync.WaitGroup

	mu  sync.Mutex
	pub zmq4.Socket    // guarded by mu; nil while a connecting PUB is not connected
	seq uint64         // guarded by mu; the next batch's number
	buf []bufferedSend // guarded by mu; ring of the last max batches
	// bound: the PUB listens (the engine binds); else connect owns it.
	bound  bool
	encode func(Batch) []byte // nil: Encode
}

type bufferedSend struct {
	seq     uint64
	payload []byte
}

// NewPublisher opens the sockets. endpoint and replay are ZeroMQ addresses
// ("tcp://*:5557" binds, "tcp://127.0.0.1:5557" connects); replay may be
// empty. drop is the fraction of batches to lose on the way out (faults).
func NewPublisher(endpoint, replay, topic string, bufferSteps int, drop float64) (*Publisher, error) {
	ctx, cancel := context.WithCancel(context.Background())
	p := &Publisher{topic: []byte(topic), max: max(1, bufferSteps), drop: drop, ctx: ctx, cancel: cancel}
	if binds(endpoint) {
		p.pub, p.bound = zmq4.NewPub(ctx), true
		if err := p.pub.Listen(endpoint); err != nil {
			cancel()
			_ = p.pub.Close()
			return nil, fmt.Errorf("kv events: cannot bind %s: %w", endpoint, err)
		}
	} else {
		// libzmq connects in the background and reconnects after the peer
		// goes away; so does this.
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.connect(endpoint)
		}()
	}
	if replay != "" {
		p.replay = zmq4.NewRouter(ctx, zmq4.WithID(zmq4.SocketIdentity("replay")))
		if err := p.replay.Listen(replay); err != nil {
			p.Close()
			return nil, fmt.Errorf("kv events: cannot bind replay %s: %w", replay, err)
		}
		p.wg.Add(1)
		go func() {
			defer p.wg.Done()
			p.serveReplay()
		}()
	}
	return p, nil
}

// Encoding sets how batches are written (Encode, vLLM's, unless set; or
// EncodeSGLang). Call it before the first Publish.
func (p *Publisher) Encoding(enc func(Batch) []byte) { p.encode = enc }

// Publish sends one batch and keeps it for replay.
func (p *Publisher) Publish(b Batch) {
	enc := p.encode
	if enc == nil {
		enc = Encode
	}
	payload := enc(b)
	p.mu.Lock()
	seq := p.seq
	p.seq++
	p.buf = append(p.buf, bufferedSend{seq, payload})
	if len(p.buf) > p.max {
		p.buf = p.buf[len(p.buf)-p.max:]
	}
	p.mu.Unlock()
	if p.drop > 0 && rand.Float64() < p.drop {
		return
	}
	var s [8]byte
	binary.BigEndian.PutUint64(s[:], seq)
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.pub != nil {
		_ = p.pub.SendMulti(zmq4.NewMsgFrom(p.topic, s[:], payload)) // no subscriber: dropped, as a PUB does
	}
}

// connect keeps a PUB connected to endpoint until Close.
func (p *Publisher) connect(endpoint string) {
	for p.ctx.Err() == nil {
		ctx, cancel := context.WithCancel(p.ctx)
		s, died, err := dialWatched(ctx, endpoint, zmq4.NewPub)
		if err != nil {
			cancel()
			// Closed, or the ZMTP handshake failed (go-zeromq retries only
			// a refused dial: a subscriber that went away mid-handshake
			// ends Dial with an error): try again, as libzmq does.
			select {
			case <-p.ctx.Done():
				return
			case <-time.After(100 * time.Millisecond):
			}
			continue
		}
		p.mu.Lock()
		p.pub = s
		p.mu.Unlock()
		select {
		case <-died:
		case <-p.ctx.Done():
		}
		p.mu.Lock()
		p.pub = nil
		p.mu.Unlock()
		cancel()
		_ = s.Close()
	}
}

func (p *Publisher) serveReplay() {
	for {
		m, err := p.replay.Recv()
		if err != nil {
			return // closed
		}
		if len(m.Frames) != 3 || len(m.Frames[2]) != 8 {
			continue // vLLM logs "Invalid replay request" and goes on
		}
		id, start := m.Frames[0], binary.BigEndian.Uint64(m.Frames[2])
		p.mu.Lock()
		var out []bufferedSend
		for _, b := range p.buf {
			if b.seq >= start {
				out = append(out, b)
			}
		}
		p.mu.Unlock()
		for _, b := range out {
			var s [8]byte
			binary.BigEndian.PutUint64(s[:], b.seq)
			if p.replay.SendMulti(zmq4.NewMsgFrom(id, nil, s[:], b.payload)) != nil {
				break
			}
		}
		_ = p.replay.SendMulti(zmq4.NewMsgFrom(id, nil, endSeq[:], nil))
	}
}

// Close shuts the sockets.
func (p *Publisher) Close() {
	p.cancel()
	if p.bound {
		_ = p.pub.Close()
	}
	if p.replay != nil {
		_ = p.replay.Close()
	}
	p.wg.Wait()
}

// Subscriber is the head's side: it reads one engine's batches in order,
// fills gaps from the engine's replay socket, and notices an engine that
// restarted (its numbering starts again at 0).
type Subscriber struct {
	// Endpoint is the engine's endpoint as given to it; the subscriber
	// listens where the engine connects and connects where it binds (a
	// wildcard host is reached on 127.0.0.1).
	Endpoint string
	// Replay is the engine's replay endpoint (it always binds); empty: none.
	Replay string
	Topic  string
	// ReplayTimeout bounds one replay exchange (default 2 s).
	ReplayTimeout time.Duration
}

// Handler hears the subscriber's news, in order, from one goroutine.
type Handler interface {
	// Batch is the next batch in the engine's numbering.
	Batch(seq uint64, b Batch)
	// Lost: batches before seq could not be had (nothing to replay them
	// from, or the engine restarted); what was known of the engine's cache
	// is no longer to be trusted. restarted says the engine started anew.
	Lost(seq uint64, restarted bool)
	// Bad: a message that could not be read (it is skipped).
	Bad(err error)
}

// Run reads until ctx ends. It returns the error that stopped it, or nil.
func (s *Subscriber) Run(ctx context.Context, h Handler) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var sub zmq4.Socket
	var died <-chan struct{}
	if binds(s.Endpoint) {
		// The engine binds: dial it (on 127.0.0.1 for a wildcard). A broken
		// connection ends Run; the caller starts another.
		var err error
		if sub, died, err = dialWatched(ctx, s.Endpoint, zmq4.NewSub); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
	} else {
		// The engine connects (and reconnects) to us.
		var err error
		if sub, err = listenSub(ctx, s.Endpoint); err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("kv events: cannot listen on %s for the engine: %w", s.Endpoint, err)
		}
	}
	defer sub.Close()
	if err := sub.SetOption(zmq4.OptionSubscribe, s.Topic); err != nil {
		return err
	}
	if died != nil {
		go func() {
			select {
			case <-died:
				cancel() // unblocks Recv
			case <-ctx.Done():
			}
		}()
	}
	var next uint64
	started := false
	for {
		m, err := sub.Recv()
		if err != nil {
			select {
			case <-died:
				return errors.New("kv events: the connection to the engine broke")
			default:
			}
			if ctx.Err() != nil {
				return nil
			}
			if died != nil {
				return fmt.Errorf("kv events: %w", err)
			}
			// Listening: a connection ended (EOF; the engine reconnects
			// or a new one comes). The socket goes on accepting.
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(10 * time.Millisecond):
			}
			continue
		}
		seq, b, err := s.parse(m.Frames)
		if err != nil {
			h.Bad(err)
			continue
		}
		switch {
		case !started || seq == next:
			if !started && seq != 0 {
				// Joined late: what the engine holds from before is unknown
				// unless the replay buffer still has it all.
				if !s.replay(ctx, 0, seq, h) {
					h.Lost(seq, false)
				}
			}
		case seq > next:
			if !s.replay(ctx, next, seq, h) {
				h.Lost(seq, false)
			}
		default: // seq < next: the engine started its numbering again
			h.Lost(seq, true)
			if seq != 0 && !s.replay(ctx, 0, seq, h) {
				h.Lost(seq, false)
			}
		}
		started = true
		h.Batch(seq, b)
		next = seq + 1
	}
}

func (s *Subscriber) parse(frames [][]byte) (uint64, Batch, error) {
	if len(frames) != 3 {
		return 0, Batch{}, fmt.Errorf("kv events: a message of %d frames, want [topic, seq, payload]", len(frames))
	}
	if len(frames[1]) != 8 {
		return 0, Batch{}, fmt.Errorf("kv events: a sequence number of %d bytes, want 8", len(frames[1]))
	}
	b, err := Decode(frames[2])
	if err != nil {
		return 0, Batch{}, err
	}
	return binary.BigEndian.Uint64(frames[1]), b, nil
}

// replay asks the engine for batches from..until-1 and hands them on; false
// when it has no replay socket or could not give every one of them.
func (s *Subscriber) replay(ctx context.Context, from, until uint64, h Handler) bool {
	if s.Replay == "" {
		return false
	}
	timeout := s.ReplayTimeout
	if timeout <= 0 {
		timeout = 2 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	d := zmq4.NewDealer(ctx, zmq4.WithDialerMaxRetries(3), zmq4.WithDialerRetry(100*time.Millisecond))
	defer d.Close()
	if err := d.Dial(strings.Replace(s.Replay, "*", "127.0.0.1", 1)); err != nil {
		return false
	}
	var req [8]byte
	binary.BigEndian.PutUint64(req[:], from)
	if err := d.SendMulti(zmq4.NewMsgFrom(nil, req[:])); err != nil {
		return false
	}
	got := map[uint64]Batch{}
	for {
		m, err := d.Recv()
		if err != nil {
			return false
		}
		f := m.Frames
		if len(f) > 0 && len(f[0]) == 0 {
			f = f[1:] // the empty delimiter
		}
		if len(f) != 2 || len(f[0]) != 8 {
			h.Bad(errors.New("kv events: a replay reply that is not [seq, payload]"))
			return false
		}
		if [8]byte(f[0]) == endSeq {
			break
		}
		seq := binary.BigEndian.Uint64(f[0])
		if seq < from || seq >= until {
			continue
		}
		b, err := Decode(f[1])
		if err != nil {
			h.Bad(err)
			return false
		}
		got[seq] = b
	}
	for q := from; q < until; q++ {
		if _, ok := got[q]; !ok {
			return false // the buffer no longer reaches back that far
		}
	}
	for q := from; q < until; q++ {
		h.Batch(q, got[q])
	}
	return true
}
