package store

import (
	"path/filepath"
	"testing"

	"github.com/shoalhq/shoal/spec"
	"github.com/stretchr/testify/require"
)

func TestStore(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.db")
	s, err := Open(path)
	require.NoError(t, err)
	d := &spec.Deployment{Name: "m"}
	created, err := s.PutDeployment(d, "name: m")
	require.NoError(t, err)
	require.True(t, created)
	created, err = s.PutDeployment(d, "name: m # v2")
	require.NoError(t, err)
	require.False(t, created)
	require.NoError(t, s.PutGroup(&Group{ID: "m-1", Deployment: "m", Epoch: 1, Members: []GroupMember{{NodeID: "a"}}}))
	require.NoError(t, s.Close())

	_, err = Open(path + "/nope/x")
	require.Error(t, err)

	s, err = Open(path)
	require.NoError(t, err)
	defer s.Close()
	rec, err := s.Deployment("m")
	require.NoError(t, err)
	require.Equal(t, "name: m # v2", rec.SpecYAML)
	gs, err := s.Groups()
	require.NoError(t, err)
	require.Len(t, gs, 1)
	require.Equal(t, uint64(1), gs[0].Epoch)
	require.NoError(t, s.DeleteDeployment("m"))
	_, err = s.Deployment("m")
	require.ErrorIs(t, err, ErrNotFound)
	require.ErrorIs(t, s.DeleteDeployment("m"), ErrNotFound)
}

// TestAdoptSpec: only the deployment's groups without recorded engine
// settings take the given ones.
func TestAdoptSpec(t *testing.T) {
	s, err := Open(filepath.Join(t.TempDir(), "s.db"))
	require.NoError(t, err)
	defer s.Close()
	for _, g := range []*Group{{ID: "m-1", Deployment: "m"}, {ID: "m-2", Deployment: "m", Spec: "kept"}, {ID: "o-1", Deployment: "o"}} {
		require.NoError(t, s.PutGroup(g))
	}
	require.NoError(t, s.AdoptSpec("m", "old"))
	gs, err := s.Groups()
	require.NoError(t, err)
	got := map[string]string{}
	for _, g := range gs {
		got[g.ID] = g.Spec
	}
	require.Equal(t, map[string]string{"m-1": "old", "m-2": "kept", "o-1": ""}, got)
}

// TestPrevSpecFollowsEngineChanges: the spec before the last engine change
// is kept; a change of replica count alone keeps it as it was. With roles,
// a change to one role's engine is a change of the deployment's engine
// settings, and a role's replica count is not.
func TestPrevSpecFollowsEngineChanges(t *testing.T) {
	for name, build := range map[string]func(args []string, count int) *spec.Deployment{
		"plain": func(args []string, count int) *spec.Deployment {
			return &spec.Deployment{Name: "m", Engine: spec.Engine{Args: args}, Replicas: spec.Replicas{Count: count}}
		},
		"roles, the decode role's engine and count": func(args []string, count int) *spec.Deployment {
			return &spec.Deployment{Name: "m", Engine: spec.Engine{Kind: spec.EngineVLLM}, Roles: &spec.Roles{
				Prefill: spec.Role{Replicas: spec.Replicas{Count: 1}},
				Decode:  spec.Role{Replicas: spec.Replicas{Count: count}, Engine: &spec.RoleEngine{Args: args}}}}
		},
	} {
		t.Run(name, func(t *testing.T) {
			s, err := Open(filepath.Join(t.TempDir(), "s.db"))
			require.NoError(t, err)
			defer s.Close()
			put := func(args []string, count int, yaml string) *DeploymentRecord {
				_, err := s.PutDeployment(build(args, count), yaml)
				require.NoError(t, err)
				r, err := s.Deployment("m")
				require.NoError(t, err)
				return r
			}
			require.Empty(t, put(nil, 1, "v1").PrevSpecYAML)
			require.Empty(t, put(nil, 2, "v2").PrevSpecYAML, "a count is not an engine setting")
			require.Equal(t, "v2", put([]string{"--x"}, 2, "v3").PrevSpecYAML, "the engine changed")
			require.Equal(t, "v2", put([]string{"--x"}, 3, "v4").PrevSpecYAML, "kept across a count change")
		})
	}
}
