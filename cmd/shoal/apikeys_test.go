package main

import (
	"io"
	"path/filepath"
	"testing"

	"github.com/shoalhq/shoal/coordinator/router"
	"github.com/stretchr/testify/require"
	"github.com/urfave/cli/v2"
)

// TestRouterIsClosedByDefault: a router without API keys does not start
// unless --no-api-keys says so; the default key file is found; the two
// together are a contradiction.
func TestRouterIsClosedByDefault(t *testing.T) {
	dir := t.TempDir()
	old := defaultAPIKeys
	defaultAPIKeys = filepath.Join(dir, "api-keys.yaml")
	defer func() { defaultAPIKeys = old }()
	parse := func(enabled bool, args ...string) (router.Config, error) {
		var rc router.Config
		var err error
		app := &cli.App{Name: "shoal", Flags: []cli.Flag{apiKeysFlag, noAPIKeysFlag, idleTimeoutFlag, totalTimeoutFlag, holdForFlag,
			retriesFlag, ejectAfterFlag, kvIndexBlocksFlag, allowedOriginsFlag, allowedMethodsFlag, allowedHeadersFlag, allowCredentialsFlag},
			Action: func(c *cli.Context) error { rc, err = routerConfig(c, enabled); return nil }}
		require.NoError(t, app.Run(append([]string{"shoal"}, args...)))
		return rc, err
	}
	_, err := parse(true)
	require.ErrorContains(t, err, "the router would serve anyone")
	require.ErrorContains(t, err, defaultAPIKeys)
	rc, err := parse(true, "--no-api-keys")
	require.NoError(t, err)
	require.Nil(t, rc.APIKeys)
	_, err = parse(false)
	require.NoError(t, err, "a coordinator without a router needs no keys")

	// The key file as `shoal apikey create --file` writes it, at the default path.
	app := newApp()
	app.Writer, app.ErrWriter = io.Discard, io.Discard
	require.NoError(t, app.Run([]string{"shoal", "apikey", "create", "--name", "team", "--models", "*", "--file", defaultAPIKeys}))
	rc, err = parse(true)
	require.NoError(t, err)
	require.NotNil(t, rc.APIKeys, "the default file is found")
	_, err = parse(true, "--no-api-keys")
	require.ErrorContains(t, err, "contradict")
}
