package containerd

import (
	"bytes"
	"context"
	"io"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// Both streams are kept whole whichever ends first: the bug of the shim's
// own file logging was losing stderr when stdout ended before it.
func TestCopyStreamsKeepsBothWhicheverEndsFirst(t *testing.T) {
	for _, stdoutFirst := range []bool{true, false} {
		outR, outW, err := os.Pipe()
		require.NoError(t, err)
		errR, errW, err := os.Pipe()
		require.NoError(t, err)
		var log lockedBuffer
		done := make(chan int)
		go func() { done <- copyStreams(context.Background(), &log, outR, errR) }()
		_, _ = io.WriteString(outW, "INFO serving\n")
		_, _ = io.WriteString(errW, "vllm serve: error: argument --distributed-executor-backend: invalid choice: 'nccl'\n")
		if stdoutFirst {
			outW.Close()
			time.Sleep(10 * time.Millisecond) // stdout's end reaches the writer first
			errW.Close()
		} else {
			errW.Close()
			outW.Close()
		}
		require.Equal(t, 0, <-done)
		require.Contains(t, log.String(), "INFO serving\n")
		require.Contains(t, log.String(), "invalid choice: 'nccl'\n")
	}
}

func TestCopyStreamsDrainsThenStops(t *testing.T) {
	r, w, err := os.Pipe()
	require.NoError(t, err)
	defer w.Close()
	ctx, cancel := context.WithCancel(context.Background())
	var log lockedBuffer
	done := make(chan int)
	go func() { done <- copyStreams(ctx, &log, r) }()
	_, _ = io.WriteString(w, "last words\n")
	cancel() // the shim's SIGTERM; the writer end stays open (a stuck child)
	select {
	case <-done:
	case <-time.After(loggerDrain + 5*time.Second):
		t.Fatal("the writer did not stop after the drain")
	}
	require.Equal(t, "last words\n", log.String())
}
