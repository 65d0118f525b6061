package coordinator

import (
	"fmt"
	"sync"
	"time"
)

// events keeps the recent events of each deployment for `shoal describe`.
type events struct {
	mu    sync.Mutex
	byDep map[string][]string // guarded by mu
	last  map[string]string   // guarded by mu; last message per key, to skip repeats
}

const eventsPerDeployment = 50

func newEvents() *events { return &events{byDep: map[string][]string{}, last: map[string]string{}} }

// add records an event unless key's previous event had the same text.
func (e *events) add(dep, key, format string, args ...any) bool {
	msg := fmt.Sprintf(format, args...)
	e.mu.Lock()
	defer e.mu.Unlock()
	if key != "" {
		if e.last[key] == msg {
			return false
		}
		e.last[key] = msg
	}
	l := append(e.byDep[dep], time.Now().UTC().Format("15:04:05")+"  "+msg)
	if len(l) > eventsPerDeployment {
		l = l[len(l)-eventsPerDeployment:]
	}
	e.byDep[dep] = l
	return true
}

func (e *events) list(dep string) []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return append([]string(nil), e.byDep[dep]...)
}
