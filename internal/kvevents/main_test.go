package kvevents

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain fails the package when a test leaves a goroutine running. One is
// go-zeromq's, not ours: its PUB socket's Close never stops the goroutine
// that writes for it (pubMWriter.run waits on a condition nobody signals),
// so every PUB closed leaves one behind, waiting.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, goleak.IgnoreAnyFunction("github.com/go-zeromq/zmq4.(*pubMWriter).run"))
}
