package layout

import (
	"bufio"
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
)

const mod = "github.com/shoalhq/shoal"

type pkg struct {
	path    string
	imports []string // direct
	deps    []string // transitive
}

func list(t *testing.T) []pkg {
	t.Helper()
	cmd := exec.Command("go", "list", "-f", "{{.ImportPath}}|{{join .Imports \" \"}}|{{join .Deps \" \"}}", mod+"/...")
	cmd.Dir = root(t)
	cmd.Env = append(os.Environ(), "CGO_CFLAGS=-Wno-deprecated-declarations")
	out, err := cmd.Output()
	require.NoError(t, err, "go list")
	var ps []pkg
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 1<<20), 16<<20)
	for sc.Scan() {
		f := strings.Split(sc.Text(), "|")
		ps = append(ps, pkg{path: f[0], imports: strings.Fields(f[1]), deps: strings.Fields(f[2])})
	}
	require.NotEmpty(t, ps)
	return ps
}

func root(t *testing.T) string {
	t.Helper()
	dir, err := filepath.Abs("../..")
	require.NoError(t, err)
	return dir
}

func under(p, prefix string) bool { return p == prefix || strings.HasPrefix(p, prefix+"/") }

// TestImportRules checks docs/architecture.md §8.
func TestImportRules(t *testing.T) {
	rules := []struct {
		what   string
		from   []string // packages the rule applies to (and those below them)
		direct bool     // direct imports only
		banned []string // packages (and those below them) they must not reach
	}{
		{"hardware, engines and weights know nothing of the daemons",
			[]string{mod + "/gpu", mod + "/rdma", mod + "/engine", mod + "/model"}, false,
			[]string{mod + "/agent", mod + "/coordinator"}},
		{"the coordinator never touches NVML", []string{mod + "/coordinator"}, false, []string{"github.com/NVIDIA/go-nvml"}},
		{"the router's hot path never reads the store", []string{mod + "/coordinator/router"}, false,
			[]string{mod + "/coordinator/store", "go.etcd.io/bbolt"}},
		{"the reconciler's decision does no I/O", []string{mod + "/coordinator/plan"}, true,
			[]string{"go.etcd.io/bbolt", "google.golang.org/grpc", "net", "net/http", "os", "os/exec"}},
		{"the agent's decision and runner never talk to the coordinator", []string{mod + "/agent"}, false,
			[]string{mod + "/coordinator"}},
	}
	ps := list(t)
	checked := map[string]int{}
	for _, p := range ps {
		for _, r := range rules {
			applies := false
			for _, f := range r.from {
				applies = applies || under(p.path, f)
			}
			if !applies {
				continue
			}
			checked[r.what]++
			reach := p.deps
			if r.direct {
				reach = p.imports
			}
			for _, d := range reach {
				for _, b := range r.banned {
					if under(d, b) {
						t.Errorf("%s: %s imports %s", r.what, p.path, d)
					}
				}
			}
		}
	}
	for _, r := range rules {
		require.Positive(t, checked[r.what], "rule %q matched no package: is the layout still as documented?", r.what)
	}
}

// TestNothingPointsOutsideTheRepository: the repository explains itself;
// no file refers to the workspace around it.
func TestNothingPointsOutsideTheRepository(t *testing.T) {
	dir := root(t)
	cmd := exec.Command("git", "ls-files", "-z")
	cmd.Dir = dir
	out, err := cmd.Output()
	if err != nil {
		t.Skipf("not a git checkout: %v", err)
	}
	needle := []byte("../" + "shared")
	var bad []string
	for _, f := range strings.Split(string(out), "\x00") {
		if f == "" || strings.HasPrefix(f, ".ci/") {
			continue
		}
		b, err := os.ReadFile(filepath.Join(dir, f))
		if err != nil {
			continue // deleted in the work tree
		}
		if bytes.Contains(b, needle) {
			bad = append(bad, f)
		}
	}
	require.Empty(t, bad, "these files point outside the repository; move what they need into docs/")
}
