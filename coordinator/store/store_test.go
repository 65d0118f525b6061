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
