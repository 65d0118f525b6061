package router

import (
	"net"
	"net/http"

	"github.com/shoalhq/shoal/coordinator/router/h1"
)

// Server is the router's HTTP/1.1 front (package h1): the proxied OpenAI
// POSTs on its fast path, everything else through Handler() on net/http.
type Server = h1.Server

// NewServer returns a Server for r on ln; Serve starts it.
func (r *Router) NewServer(ln net.Listener) *Server {
	return h1.NewServer(ln, h1.Config{
		Handler: func(w http.ResponseWriter, req *http.Request, body func() ([]byte, error)) {
			r.serve(w.(*h1.ResponseWriter), req, body)
		},
		Fallback:      r.Handler(),
		Paths:         modelRoutes,
		Keep:          frontHeaders[:],
		MaxBody:       r.cfg.MaxBody,
		AfterShutdown: r.up.CloseIdle,
		Log:           r.log,
	})
}

// frontHeaders are the request headers the router reads or passes on.
var frontHeaders = [...]string{"Authorization", "Content-Type", "Accept", "Openai-Organization",
	"X-Request-Id", "Routing-Strategy", "X-Session-Id", "Origin"}
