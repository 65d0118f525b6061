package model

import (
	"context"
	"errors"
	"fmt"
	"github.com/shoalhq/shoal/internal/bytesize"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// DefaultWorkers is the number of concurrent ranged GETs: 4 per CPU, from 8
// to 64. Object stores give each stream ~100 MB/s, so a GPU host with many
// cores runs enough streams to fill a 25–400 Gb/s link, while a small host
// does not drown in streams it has no CPU to serve (measured in
// bench/download.sh: 32 streams on 2 cores were ~1.8× slower than 8).
var DefaultWorkers = max(8, min(64, 4*runtime.NumCPU()))

// DefaultChunkSize is the ranged part: 64 MiB, as boto3 and AIBrix use.
const (
	DefaultChunkSize = 64 << 20
	bufSize          = 1 << 20
)

// Options tune a pull.
type Options struct {
	// Dir receives the files; it is created if missing.
	Dir    string
	Filter Filter
	// Workers is the number of concurrent ranged GETs across all files.
	Workers int
	// ChunkSize is the size of a ranged part.
	ChunkSize int64
	// SkipVerify skips the content hash check (size is always checked).
	SkipVerify bool
	// Force lists the source again even when Dir holds a completed pull.
	Force bool
	// MaxRetries bounds consecutive failed attempts of one part that made no
	// progress. A full disk is waited out instead, for as long as ctx allows.
	MaxRetries int
	Log        *slog.Logger
	// OnProgress is called about once a second and once at the end.
	OnProgress func(Progress)
	// LogEvery is the interval of the progress totals in the log.
	LogEvery time.Duration
	// RateLimit caps the pull's total transfer rate in bytes/s (0: none), so
	// a pull does not starve serving traffic on a shared storage network.
	RateLimit int64
}

// Progress is a pull's state for logs, status and progress bars.
type Progress struct {
	Phase     string        `json:"phase"` // waiting, listing, downloading, verifying, complete, failed
	Files     int           `json:"files"`
	FilesDone int           `json:"files_done"`
	Bytes     int64         `json:"bytes"`
	BytesDone int64         `json:"bytes_done"`
	Reused    int64         `json:"reused"` // bytes already on disk when the pull started
	Rate      float64       `json:"rate"`   // bytes/s over the last seconds
	ETA       time.Duration `json:"eta"`
	Elapsed   time.Duration `json:"elapsed"`
	Message   string        `json:"message,omitempty"`
}

// Fraction is BytesDone/Bytes, 0 when nothing is known yet.
func (p Progress) Fraction() float64 {
	if p.Bytes <= 0 {
		return 0
	}
	return float64(p.BytesDone) / float64(p.Bytes)
}

// Pull makes dir a complete copy of src's selected files and returns the
// manifest. It is safe to call again after any interruption: finished files
// are kept and partial ones resume where their synced bytes end.
func Pull(ctx context.Context, src Source, opt Options) (*Manifest, error) {
	if opt.Workers <= 0 {
		opt.Workers = DefaultWorkers
	}
	if opt.ChunkSize <= 0 {
		opt.ChunkSize = DefaultChunkSize
	}
	if opt.MaxRetries <= 0 {
		opt.MaxRetries = 8
	}
	if opt.Log == nil {
		opt.Log = slog.New(slog.DiscardHandler)
	}
	if opt.LogEvery <= 0 {
		opt.LogEvery = 10 * time.Second
	}
	if err := opt.Filter.Check(); err != nil {
		return nil, err
	}
	p := &puller{src: src, opt: opt, log: opt.Log.With("model", src.String(), "dir", opt.Dir), start: time.Now(), boot: bootID()}
	if opt.RateLimit > 0 {
		p.limit = &limiter{rate: float64(opt.RateLimit), last: time.Now()}
	}
	return p.run(ctx)
}

type puller struct {
	src   Source
	opt   Options
	log   *slog.Logger
	start time.Time
	boot  string // kernel boot id; "" makes every progress record wait for fsync

	files     int
	filesDone atomic.Int64
	bytes     int64
	done      atomic.Int64 // bytes on disk, reused ones included
	reused    int64
	phase     atomic.Value // string
	message   atomic.Value // string

	mu      sync.Mutex
	queue   []task
	pending int // tasks queued or running
	cond    *sync.Cond
	err     error
	active  map[*partFile]bool
	samples []sample
	limit   *limiter
	hctx    context.Context // hashers live until the pull ends
}

// limiter is a token bucket shared by the workers: each takes its bytes up
// front and sleeps off any debt, so the sum of all streams keeps the rate.
type limiter struct {
	mu     sync.Mutex
	rate   float64
	tokens float64
	last   time.Time
}

func (l *limiter) wait(ctx context.Context, n int) error {
	l.mu.Lock()
	now := time.Now()
	l.tokens = min(l.tokens+now.Sub(l.last).Seconds()*l.rate, l.rate/4)
	l.last = now
	l.tokens -= float64(n)
	debt := -l.tokens
	l.mu.Unlock()
	if debt <= 0 {
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-time.After(time.Duration(debt / l.rate * float64(time.Second))):
		return nil
	}
}

type sample struct {
	at    time.Time
	bytes int64
}

type task struct {
	pf    *partFile
	chunk int
}

// partFile is one file being downloaded.
type partFile struct {
	f        File
	path     string // partial data
	final    string
	fh       *os.File
	started  time.Time
	verifies int
	hash     *hasher // nil without a digest or with SkipVerify

	mu      sync.Mutex
	st      partState // guarded by mu
	dirty   bool      // guarded by mu
	left    int       // chunks not finished; guarded by mu
	resumed int64
}

func (p *puller) setPhase(s string) { p.phase.Store(s) }

func (p *puller) progress() Progress {
	ph, _ := p.phase.Load().(string)
	msg, _ := p.message.Load().(string)
	pr := Progress{Phase: ph, Files: p.files, FilesDone: int(p.filesDone.Load()), Bytes: p.bytes,
		BytesDone: p.done.Load(), Reused: p.reused, Elapsed: time.Since(p.start), Message: msg}
	p.mu.Lock()
	if n := len(p.samples); n >= 2 {
		a, b := p.samples[0], p.samples[n-1]
		if dt := b.at.Sub(a.at).Seconds(); dt > 0 {
			pr.Rate = float64(b.bytes-a.bytes) / dt
		}
	}
	p.mu.Unlock()
	if pr.Rate > 0 {
		pr.ETA = time.Duration(float64(pr.Bytes-pr.BytesDone) / pr.Rate * float64(time.Second))
	}
	return pr
}

func (p *puller) run(ctx context.Context) (*Manifest, error) {
	dir := p.opt.Dir
	p.setPhase("waiting")
	if err := os.MkdirAll(filepath.Join(dir, partialDir), 0o755); err != nil {
		return nil, fmt.Errorf("model directory: %w", err)
	}
	unlock, err := lock(ctx, dir, func(holder string) {
		p.log.Info("waiting for another pull of this model to finish", "lock", filepath.Join(dir, lockFile), "holder", holder)
		p.report()
	})
	if err != nil {
		return nil, err
	}
	defer unlock()

	if m, err := ReadManifest(dir); err == nil && !p.opt.Force {
		if m.Source != p.src.String() {
			return nil, fmt.Errorf("%s already holds %s; give %s its own model.path", dir, m.Source, p.src)
		}
		if err := checkSizes(dir, m.Files); err == nil {
			p.files, p.bytes, p.reused = len(m.Files), m.Bytes, m.Bytes
			p.done.Store(m.Bytes)
			p.filesDone.Store(int64(len(m.Files)))
			p.setPhase("complete")
			p.report()
			p.log.Info("model already complete, not downloading", "files", len(m.Files), "bytes", m.Bytes)
			return m, nil
		} else {
			p.log.Warn("completed model lost a file; pulling again", "reason", err)
		}
	}
	var old Manifest
	_ = readJSON(filepath.Join(dir, manifestFile), &old)
	_ = os.Remove(filepath.Join(dir, completeFile))

	p.setPhase("listing")
	p.report()
	all, err := p.src.List(ctx)
	if err != nil {
		return nil, err
	}
	var sel []File
	for _, f := range all {
		if p.opt.Filter.Match(f.Name) {
			sel = append(sel, f)
		}
	}
	if len(sel) == 0 {
		return nil, fmt.Errorf("%s: the filter kept none of its %d files (suffixes %v, include %v, exclude %v)", p.src, len(all), p.opt.Filter.Suffixes, p.opt.Filter.Include, p.opt.Filter.Exclude)
	}
	sort.Slice(sel, func(i, j int) bool { return sel[i].Name < sel[j].Name })
	m := &Manifest{Source: p.src.String(), Files: sel, Boot: p.boot}
	for _, f := range sel {
		m.Bytes += f.Size
	}
	if err := writeJSONAtomic(filepath.Join(dir, manifestFile), m, true); err != nil {
		return nil, fmt.Errorf("write manifest: %w", err)
	}
	p.files, p.bytes = len(sel), m.Bytes
	prev := map[string]File{}
	if old.Source == m.Source && p.boot != "" && old.Boot == p.boot {
		for _, f := range old.Files {
			prev[f.Name] = f
		}
	}

	p.cond = sync.NewCond(&p.mu)
	hctx, stopHash := context.WithCancel(ctx)
	defer stopHash()
	p.hctx = hctx
	p.active = map[*partFile]bool{}
	need := int64(0)
	for _, f := range sel {
		final := filepath.Join(dir, filepath.FromSlash(f.Name))
		if st, err := os.Stat(final); err == nil && st.Size() == f.Size {
			if o, ok := prev[f.Name]; ok && o.ETag == f.ETag {
				p.keep(f, "present from an earlier pull")
				continue
			}
			if !p.opt.SkipVerify && hasDigest(f) {
				if err := verify(final, f); err == nil {
					p.keep(f, "present and verified")
					continue
				}
			} else if !hasDigest(f) {
				p.keep(f, "present with the right size (the source gives no digest)")
				continue
			}
		}
		pf, err := p.openPart(f, final)
		if err != nil {
			p.closeAll()
			return nil, err
		}
		need += f.Size - pf.resumed
	}
	p.reused = p.done.Load()
	if free, err := freeBytes(dir); err == nil && free < need {
		p.log.Warn("not enough free disk space for this model; the pull will wait when the disk fills",
			"need", human(need), "free", human(free))
		p.message.Store(fmt.Sprintf("needs %s, %s free", human(need), human(free)))
	}
	p.log.Info("model pull starting", "files", p.files, "bytes", human(p.bytes), "to_fetch", human(need),
		"reused", human(p.reused), "workers", p.opt.Workers, "part", human(p.opt.ChunkSize))

	p.setPhase("downloading")
	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var wg sync.WaitGroup
	for i := 0; i < p.opt.Workers; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.worker(ctx, cancel)
		}()
	}
	tick := make(chan struct{})
	go func() {
		defer close(tick)
		p.ticker(ctx)
	}()
	wg.Wait()
	cancel()
	<-tick
	p.persistAll()
	p.closeAll()
	p.mu.Lock()
	err = p.err
	p.mu.Unlock()
	if err == nil && parent.Err() != nil {
		err = parent.Err()
	}
	if err == nil && int(p.filesDone.Load()) != p.files {
		err = fmt.Errorf("pull ended with %d of %d files", p.filesDone.Load(), p.files)
	}
	if err != nil {
		p.setPhase("failed")
		p.message.Store(err.Error())
		p.report()
		return nil, err
	}
	p.setPhase("syncing")
	if err := syncFS(dir); err != nil {
		return nil, fmt.Errorf("sync %s: %w", dir, err)
	}
	m.Completed = time.Now().UTC()
	if err := writeJSONAtomic(filepath.Join(dir, completeFile), m, true); err != nil {
		return nil, fmt.Errorf("mark complete: %w", err)
	}
	_ = os.RemoveAll(filepath.Join(dir, partialDir))
	syncDir(filepath.Join(dir, stateDir))
	p.setPhase("complete")
	p.message.Store("")
	pr := p.progress()
	el := time.Since(p.start)
	p.log.Info("model pull complete", "files", p.files, "bytes", human(p.bytes), "fetched", human(p.bytes-p.reused),
		"elapsed", el.Round(time.Millisecond), "rate", rate(float64(p.bytes-p.reused)/el.Seconds()))
	if p.opt.OnProgress != nil {
		p.opt.OnProgress(pr)
	}
	return m, nil
}

func (p *puller) keep(f File, why string) {
	p.done.Add(f.Size)
	p.filesDone.Add(1)
	p.log.Info("model file present, skipped", "file", f.Name, "size", human(f.Size), "why", why)
}

func hasDigest(f File) bool {
	return f.MD5 != "" || f.SHA256 != "" || f.GitSHA1 != "" || f.CRC32C != ""
}

// openPart opens (or resumes) the partial file for f and queues its
// unfinished chunks.
func (p *puller) openPart(f File, final string) (*partFile, error) {
	path := filepath.Join(p.opt.Dir, partialDir, filepath.FromSlash(f.Name))
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("partial directory: %w", err)
	}
	pf := &partFile{f: f, path: path, final: final, started: time.Now()}
	chunks := int((f.Size + p.opt.ChunkSize - 1) / p.opt.ChunkSize)
	var st partState
	fresh := true
	if err := readJSON(path+".state", &st); err == nil && st.ETag == f.ETag && st.Size == f.Size && st.Chunk == p.opt.ChunkSize &&
		len(st.Done) == chunks && st.Boot == p.boot {
		if info, err := os.Stat(path); err == nil && info.Size() == f.Size {
			fresh = false
		}
	}
	if fresh {
		st = partState{Boot: p.boot, ETag: f.ETag, Size: f.Size, Chunk: p.opt.ChunkSize, Done: make([]int64, chunks)}
	}
	fh, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, fmt.Errorf("open %s: %w", path, err)
	}
	if fresh {
		if err := fh.Truncate(f.Size); err != nil {
			fh.Close()
			return nil, fmt.Errorf("size %s: %w", path, err)
		}
		// Reserve the blocks now: the file system lays the file out in one
		// piece, and a disk too small shows before any byte is fetched. Where
		// that fails (a full disk, or no fallocate) the file stays sparse and
		// a full disk is waited out at the write that hits it.
		if f.Size > 0 {
			if err := unix.Fallocate(int(fh.Fd()), 0, 0, f.Size); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
				p.log.Warn("cannot reserve disk space for a file; continuing", "file", f.Name, "size", human(f.Size), "err", err)
			}
		}
	}
	pf.fh, pf.st = fh, st
	p.startHash(pf)
	for i := 0; i < chunks; i++ {
		if st.Done[i] < p.chunkLen(pf, i) {
			pf.left++
		}
		pf.resumed += st.Done[i]
	}
	p.done.Add(pf.resumed)
	if pf.resumed > 0 {
		p.log.Info("model file resuming", "file", f.Name, "have", human(pf.resumed), "size", human(f.Size))
	}
	p.mu.Lock()
	p.active[pf] = true
	p.mu.Unlock()
	if pf.left == 0 || f.Size == 0 {
		// Every byte is on disk (or there is none): verify and finish now.
		p.mu.Lock()
		p.pending++
		p.queue = append(p.queue, task{pf: pf, chunk: -1})
		p.mu.Unlock()
		return pf, nil
	}
	p.mu.Lock()
	for i := 0; i < chunks; i++ {
		if st.Done[i] < p.chunkLen(pf, i) {
			p.queue = append(p.queue, task{pf: pf, chunk: i})
			p.pending++
		}
	}
	p.mu.Unlock()
	return pf, nil
}

func (p *puller) startHash(pf *partFile) {
	if p.opt.SkipVerify || !hasDigest(pf.f) {
		return
	}
	pf.hash = startHasher(p.hctx, pf.fh, pf.f, func() int64 {
		pf.mu.Lock()
		defer pf.mu.Unlock()
		var end int64
		for i, d := range pf.st.Done {
			end = int64(i)*p.opt.ChunkSize + d
			if d < p.chunkLen(pf, i) {
				break
			}
		}
		return end
	})
}

func (p *puller) chunkLen(pf *partFile, i int) int64 {
	start := int64(i) * p.opt.ChunkSize
	return min(p.opt.ChunkSize, pf.f.Size-start)
}

func (p *puller) next(ctx context.Context) (task, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for len(p.queue) == 0 && p.pending > 0 && p.err == nil && ctx.Err() == nil {
		p.cond.Wait()
	}
	if len(p.queue) == 0 || p.err != nil || ctx.Err() != nil {
		return task{}, false
	}
	t := p.queue[0]
	p.queue = p.queue[1:]
	return t, true
}

func (p *puller) finishTask(requeue []task) {
	p.mu.Lock()
	p.pending--
	p.queue = append(p.queue, requeue...)
	p.pending += len(requeue)
	p.mu.Unlock()
	p.cond.Broadcast()
}

func (p *puller) fail(err error, cancel context.CancelFunc) {
	p.mu.Lock()
	if p.err == nil {
		p.err = err
	}
	p.mu.Unlock()
	cancel()
	p.cond.Broadcast()
}

func (p *puller) worker(ctx context.Context, cancel context.CancelFunc) {
	stop := context.AfterFunc(ctx, func() {
		p.mu.Lock() // a waiter between its check and Wait must not miss this
		p.cond.Broadcast()
		p.mu.Unlock()
	})
	defer stop()
	buf := make([]byte, bufSize)
	for {
		t, ok := p.next(ctx)
		if !ok {
			return
		}
		if t.chunk >= 0 {
			if err := p.fetchChunk(ctx, t, buf); err != nil {
				if ctx.Err() == nil {
					p.fail(fmt.Errorf("%s: %w", t.pf.f.Name, err), cancel)
				}
				p.finishTask(nil)
				return
			}
		}
		requeue, err := p.chunkDone(t)
		if err != nil {
			p.fail(err, cancel)
			p.finishTask(nil)
			return
		}
		p.finishTask(requeue)
	}
}

// fetchChunk downloads the rest of one chunk, retrying with backoff. Bytes
// count as done only after they were written.
func (p *puller) fetchChunk(ctx context.Context, t task, buf []byte) error {
	pf := t.pf
	start := int64(t.chunk) * p.opt.ChunkSize
	n := p.chunkLen(pf, t.chunk)
	failures := 0
	lastDiskLog := time.Time{}
	for {
		pf.mu.Lock()
		have := pf.st.Done[t.chunk]
		pf.mu.Unlock()
		if have >= n {
			return nil
		}
		got, err := p.fetchRange(ctx, pf, t.chunk, start+have, n-have, buf)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var he *httpError
		switch {
		case errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT):
			// Wait the disk out: space may be freed; the agent's startup timeout bounds this.
			if time.Since(lastDiskLog) > 10*time.Second {
				free, _ := freeBytes(p.opt.Dir)
				p.log.Warn("disk full; waiting for space", "file", pf.f.Name, "free", human(free),
					"remaining", human(p.bytes-p.done.Load()))
				lastDiskLog = time.Now()
			}
			p.message.Store("disk full: free space on " + p.opt.Dir)
			failures = min(failures+1, 6)
		case errors.As(err, &he) && !he.retryable():
			return err
		case errors.Is(err, errChanged), errors.Is(err, ErrNotFound):
			return err
		default:
			if got > 0 {
				failures = 0
			}
			failures++
			if failures > p.opt.MaxRetries {
				return fmt.Errorf("gave up after %d attempts: %w", failures, err)
			}
			p.log.Warn("model part failed; retrying", "file", pf.f.Name, "offset", start+have, "attempt", failures, "err", err)
		}
		backoff := time.Duration(250<<min(failures, 7)) * time.Millisecond // 0.5 s … 32 s
		backoff = backoff/2 + time.Duration(rand.Int64N(int64(backoff/2)+1))
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(backoff):
		}
	}
}

func (p *puller) fetchRange(ctx context.Context, pf *partFile, chunk int, off, n int64, buf []byte) (int64, error) {
	rc, err := p.src.Read(ctx, pf.f, off, n)
	if err != nil {
		return 0, err
	}
	defer rc.Close()
	var got int64
	for got < n {
		want := min(int64(len(buf)), n-got)
		k, rerr := io.ReadFull(rc, buf[:want])
		if k > 0 && p.limit != nil {
			if err := p.limit.wait(ctx, k); err != nil {
				return got, err
			}
		}
		if k > 0 {
			if _, werr := pf.fh.WriteAt(buf[:k], off+got); werr != nil {
				return got, werr
			}
			got += int64(k)
			pf.mu.Lock()
			pf.st.Done[chunk] += int64(k)
			pf.dirty = true
			pf.mu.Unlock()
			p.done.Add(int64(k))
			pf.hash.poke()
		}
		if rerr != nil {
			if got == n {
				break
			}
			return got, rerr
		}
	}
	return got, nil
}

// chunkDone finishes the file when its last chunk is in: sync, verify,
// rename into place. A file that fails verification is fetched again once.
func (p *puller) chunkDone(t task) ([]task, error) {
	pf := t.pf
	pf.mu.Lock()
	if t.chunk >= 0 {
		pf.left--
	}
	last := pf.left == 0
	pf.mu.Unlock()
	if !last {
		return nil, nil
	}
	if pf.hash != nil {
		if err := pf.hash.wait(); err != nil {
			pf.verifies++
			if pf.verifies > 1 {
				return nil, fmt.Errorf("%s: %w, again after a fresh download; the source object may be corrupt", pf.f.Name, err)
			}
			p.log.Warn("model file failed verification; downloading it again", "file", pf.f.Name, "err", err)
			return p.restartFile(pf), nil
		}
	}
	if err := os.MkdirAll(filepath.Dir(pf.final), 0o755); err != nil {
		return nil, err
	}
	pf.fh.Close()
	if err := os.Rename(pf.path, pf.final); err != nil {
		return nil, fmt.Errorf("%s: move into place: %w", pf.f.Name, err)
	}
	_ = os.Remove(pf.path + ".state")
	p.mu.Lock()
	delete(p.active, pf)
	p.mu.Unlock()
	p.filesDone.Add(1)
	el := time.Since(pf.started)
	p.log.Info("model file done", "file", pf.f.Name, "size", human(pf.f.Size), "elapsed", el.Round(time.Millisecond),
		"rate", rate(float64(pf.f.Size-pf.resumed)/el.Seconds()), "files_done", fmt.Sprintf("%d/%d", p.filesDone.Load(), p.files))
	return nil, nil
}

func (p *puller) restartFile(pf *partFile) []task {
	pf.mu.Lock()
	var had int64
	for i := range pf.st.Done {
		had += pf.st.Done[i]
		pf.st.Done[i] = 0
	}
	pf.dirty = true
	pf.left = len(pf.st.Done)
	pf.mu.Unlock()
	p.done.Add(-had)
	p.startHash(pf)
	out := make([]task, 0, len(pf.st.Done))
	for i := range pf.st.Done {
		out = append(out, task{pf: pf, chunk: i})
	}
	return out
}

// ticker persists progress records and reports progress until ctx ends.
func (p *puller) ticker(ctx context.Context) {
	t := time.NewTicker(time.Second)
	defer t.Stop()
	lastLog := time.Now()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		p.persistAll()
		p.mu.Lock()
		p.samples = append(p.samples, sample{time.Now(), p.done.Load()})
		if len(p.samples) > 6 {
			p.samples = p.samples[1:]
		}
		p.mu.Unlock()
		pr := p.report()
		if time.Since(lastLog) >= p.opt.LogEvery {
			lastLog = time.Now()
			p.log.Info("model pull progress", "done", human(pr.BytesDone), "total", human(pr.Bytes),
				"percent", fmt.Sprintf("%.1f", 100*pr.Fraction()), "rate", rate(pr.Rate),
				"files", fmt.Sprintf("%d/%d", pr.FilesDone, pr.Files), "eta", pr.ETA.Round(time.Second))
		}
	}
}

func (p *puller) report() Progress {
	pr := p.progress()
	if p.opt.OnProgress != nil {
		p.opt.OnProgress(pr)
	}
	return pr
}

// persistAll records each changed partial file's progress (syncing the data
// first only where the boot id is unknown).
func (p *puller) persistAll() {
	p.mu.Lock()
	files := make([]*partFile, 0, len(p.active))
	for pf := range p.active {
		files = append(files, pf)
	}
	p.mu.Unlock()
	for _, pf := range files {
		pf.mu.Lock()
		if !pf.dirty {
			pf.mu.Unlock()
			continue
		}
		st := partState{Boot: pf.st.Boot, ETag: pf.st.ETag, Size: pf.st.Size, Chunk: pf.st.Chunk, Done: append([]int64(nil), pf.st.Done...)}
		pf.dirty = false
		pf.mu.Unlock()
		if p.boot == "" {
			if err := pf.fh.Sync(); err != nil {
				continue // closed by a finished file, or a failing disk: keep the older record
			}
		}
		if err := writeJSONAtomic(pf.path+".state", st, p.boot == ""); err != nil {
			p.log.Debug("progress record not written", "file", pf.f.Name, "err", err)
		}
	}
}

func (p *puller) closeAll() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for pf := range p.active {
		pf.fh.Close()
	}
}

func human(b int64) string { return bytesize.Format(b) }

// Human formats a byte count for people, in binary units (GiB).
func Human(b int64) string { return human(b) }

func rate(bps float64) string { return human(int64(bps)) + "/s" }
