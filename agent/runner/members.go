package runner

import (
	"context"
	"fmt"
	"time"

	"github.com/shoalhq/shoal/gossip"
)

// Member is another node of a head's group.
type Member struct {
	ID string
	// Addr is its Agent API.
	Addr string
}

// MemberReport is what a member's agent says of itself.
type MemberReport struct {
	Group  string
	Epoch  uint64
	Engine string // gossip engine state
	// Term is the head term it follows.
	Term    uint64
	Message string
}

// MemberClient asks one member's agent for its state.
type MemberClient interface {
	Status(ctx context.Context) (MemberReport, error)
	Close() error
}

// memberPoll is how often a head asks each member's agent; memberTimeout
// bounds one answer.
const (
	memberPoll    = 300 * time.Millisecond
	memberTimeout = time.Second
)

// watchMembers polls the agents of cfg.Members while the run lasts (a head
// its members, a worker its head). A member whose engine failed at this
// term, or that left the group, fails the run at once;
// one whose agent stops answering fails it after its MemberGrace (an agent
// restart leaves the member's engine running and comes back within it),
// still well before gossip's failure detector declares the host dead.
func (r *Runner) watchMembers() {
	for _, m := range r.cfg.Members {
		r.goRun(func() { r.watchMember(m) })
	}
}

func (r *Runner) watchMember(m Member) {
	c, err := r.cfg.Dial(m.Addr)
	if err != nil {
		r.fail(fmt.Sprintf("member %s: %v", m.ID, err))
		return
	}
	defer c.Close()
	var since time.Time // first unanswered poll of the current outage
	for r.sleep(memberPoll) {
		asked := time.Now()
		ctx, cancel := context.WithTimeout(r.ctx, memberTimeout)
		st, err := c.Status(ctx)
		cancel()
		if r.ctx.Err() != nil {
			return
		}
		switch {
		case err != nil:
			grace := r.cfg.MemberGrace(m.ID)
			if since.IsZero() {
				since = asked // the outage began before this poll timed out
				r.log.Warn("member agent does not answer", "member", m.ID, "err", err, "grace", grace)
			}
			if time.Since(since) >= grace {
				r.fail(fmt.Sprintf("member %s unreachable for %v: %v", m.ID, grace.Round(time.Second), err))
				return
			}
		case st.Group != r.cfg.Group || st.Epoch != r.cfg.Epoch:
			r.fail(fmt.Sprintf("member %s left the group", m.ID))
			return
		case st.Engine == gossip.EngineFailed && st.Term == r.cfg.Term:
			r.fail(fmt.Sprintf("member %s engine failed: %s", m.ID, st.Message))
			return
		default:
			since = time.Time{}
		}
	}
}
