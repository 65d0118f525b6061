package agent

import (
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	agentv1 "github.com/shoalhq/shoal/proto/agent/v1"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// maxTail bounds how much of a log one request replays.
const maxTail = 8 << 20

// Logs streams engine logs from the state directory's logs/.
func (s *agentServer) Logs(req *agentv1.LogsRequest, stream agentv1.Agent_LogsServer) error {
	dir := filepath.Join(s.a.cfg.StateDir, "logs")
	entries, err := os.ReadDir(dir)
	if err != nil && !os.IsNotExist(err) {
		return status.Error(codes.Internal, err.Error())
	}
	var names []string
	for _, e := range entries {
		if n, ok := strings.CutSuffix(e.Name(), ".log"); ok && !e.IsDir() {
			names = append(names, n)
		}
	}
	sort.Strings(names)
	if req.Name != "" {
		if strings.ContainsAny(req.Name, `/\`) || !contains(names, req.Name) {
			return status.Errorf(codes.NotFound, "no engine log %q on %s; logs here: %s", req.Name, s.a.cfg.NodeID, strings.Join(names, ", "))
		}
		names = []string{req.Name}
	}
	if len(names) == 0 {
		return status.Errorf(codes.NotFound, "no engine has run on %s yet", s.a.cfg.NodeID)
	}
	tail := req.TailBytes
	if tail <= 0 || tail > maxTail {
		tail = maxTail
	}
	offsets := map[string]int64{}
	for _, n := range names {
		off, err := send(stream, filepath.Join(dir, n+".log"), n, -tail)
		if err != nil {
			return err
		}
		offsets[n] = off
	}
	for req.Follow {
		select {
		case <-stream.Context().Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
		for _, n := range names {
			off, err := send(stream, filepath.Join(dir, n+".log"), n, offsets[n])
			if err != nil {
				return err
			}
			offsets[n] = off
		}
	}
	return nil
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// send streams path from offset (negative: that many bytes before the end)
// and returns the new offset. A file that shrank (rotated) restarts at 0.
func send(stream agentv1.Agent_LogsServer, path, name string, from int64) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return from, nil // not written yet
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return from, nil
	}
	size := st.Size()
	switch {
	case from < 0:
		from = max(0, size+from)
	case from > size:
		from = 0
	}
	if _, err := f.Seek(from, io.SeekStart); err != nil {
		return from, nil
	}
	buf := make([]byte, 64<<10)
	for from < size {
		n, err := f.Read(buf)
		if n > 0 {
			if serr := stream.Send(&agentv1.LogChunk{Name: name, Data: append([]byte(nil), buf[:n]...)}); serr != nil {
				return from, serr
			}
			from += int64(n)
		}
		if err != nil {
			break
		}
	}
	return from, nil
}
