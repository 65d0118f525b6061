package router

import (
	"context"
	"io"
	"log/slog"
	"net"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/stretchr/testify/require"
)

// An engine stream cut after its first event: openai-go, through the
// router, gets the first chunk and then an error that says the stream
// broke (the router's error event), not a clean end of a short answer.
func TestCutStreamIsAnErrorToOpenAIClients(t *testing.T) {
	ln := rawBackend(t, func(c net.Conn) {
		_, _ = c.Read(make([]byte, 64<<10)) // the request
		_, _ = io.WriteString(c, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
		ev := `data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"m","choices":[{"index":0,"delta":{"role":"assistant","content":"Hel"},"finish_reason":null}]}` + "\n\n"
		_, _ = io.WriteString(c, strconv.FormatInt(int64(len(ev)), 16)+"\r\n"+ev+"\r\n")
		time.Sleep(50 * time.Millisecond)
		// The engine dies: the connection closes without the final chunk.
	})
	tb := NewTable()
	tb.Set(NewSnapshot(nil, []*Endpoint{{Model: "m", Addr: ln.Addr().String(), Group: "g", Rank: -1}}))
	r := New(tb, slog.New(slog.NewTextHandler(io.Discard, nil)), Config{})
	srv := httptest.NewServer(r.Handler())
	defer srv.Close()
	client := openai.NewClient(option.WithBaseURL(srv.URL+"/v1/"), option.WithAPIKey("none"), option.WithMaxRetries(0))
	st := client.Chat.Completions.NewStreaming(context.Background(), openai.ChatCompletionNewParams{Model: "m",
		Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage("hi")}})
	var text string
	for st.Next() {
		if ch := st.Current(); len(ch.Choices) > 0 {
			text += ch.Choices[0].Delta.Content
		}
	}
	require.Equal(t, "Hel", text, "the chunk that came is passed on")
	require.Error(t, st.Err())
	require.Contains(t, st.Err().Error(), "the engine's stream broke after it began")
}

// rawBackend serves each connection with serve (then closes it), below
// HTTP: for engines that break the protocol.
func rawBackend(t *testing.T, serve func(net.Conn)) net.Listener {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				serve(c)
			}()
		}
	}()
	return ln
}
