package containerd

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sync"
	"syscall"
	"time"
)

// LoggerFlag is the argument that makes a binary run as the engine-log
// writer (the shoal binary: `shoal --shoal-engine-log FILE`), the logging
// process containerd's shim starts for each engine container.
//
// Why not the shim's own file logging (cio.LogFile)? With stdout and
// stderr going to one file, containerd's shim (1.6 to 2.x, copyPipes)
// hands the stdout copier the file itself rather than its shared closer:
// when stdout reaches its end first, the file is closed under the stderr
// copier, and what the engine wrote to stderr just before it exited is
// lost — exactly the line saying why vLLM refused to start (seen under
// CPU load in the conformance suite, 9 exits in 30). This writer copies
// both streams into the one file until both end. It is the shim's child,
// so it outlives the agent as the engine does.
const LoggerFlag = "--shoal-engine-log"

// loggerDrain bounds how long the writer goes on copying after the shim
// asks it to stop (SIGTERM at the task's deletion, once the engine has
// exited and its pipes are at their end).
const loggerDrain = 5 * time.Second

// RunLogger is the engine-log writer: containerd's binary logging
// protocol gives it the container's stdout on fd 3, its stderr on fd 4, and
// fd 5 to close once it is ready. It appends both streams to path and
// returns (the exit status) when both have ended.
func RunLogger(path string) int {
	stdout, stderr, ready := os.NewFile(3, "stdout"), os.NewFile(4, "stderr"), os.NewFile(5, "ready")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND|os.O_CREATE, 0o644)
	if err != nil {
		fmt.Fprintf(os.Stderr, "shoal engine log %s: %v\n", path, err)
		return 1
	}
	defer f.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if ready != nil {
		_ = ready.Close() // the shim waits for this before it starts the task
	}
	return copyStreams(ctx, f, stdout, stderr)
}

// copyStreams copies every stream into w, each read written whole (no
// interleaving inside a read), until all of them end. Once ctx ends it
// drains for loggerDrain more at most.
func copyStreams(ctx context.Context, w io.Writer, streams ...io.ReadCloser) int {
	var mu sync.Mutex
	var wg sync.WaitGroup
	done := make(chan struct{})
	for _, s := range streams {
		if s == nil {
			continue
		}
		wg.Add(1)
		go func(r io.ReadCloser) {
			defer wg.Done()
			buf := make([]byte, 32<<10)
			for {
				n, err := r.Read(buf)
				if n > 0 {
					mu.Lock()
					_, _ = w.Write(buf[:n])
					mu.Unlock()
				}
				if err != nil {
					return
				}
			}
		}(s)
	}
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
		return 0
	case <-ctx.Done():
	}
	select {
	case <-done:
	case <-time.After(loggerDrain):
		for _, s := range streams {
			if s != nil {
				_ = s.Close()
			}
		}
		<-done
	}
	return 0
}
