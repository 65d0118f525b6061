package main

import (
	"io"
	"path/filepath"
	"testing"
	"time"

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
			retriesFlag, ejectAfterFlag, kvIndexBlocksFlag, holdPrefillTokensFlag, holdPrefillMaxFlag, allowedOriginsFlag, allowedMethodsFlag, allowedHeadersFlag, allowCredentialsFlag},
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

// TestRouterHoldFlags: --hold-prefill-tokens and --hold-prefill-max reach
// the router's config (0 tokens: never hold), and values that make no
// sense are refused with what to give.
func TestRouterHoldFlags(t *testing.T) {
	parse := func(args ...string) (router.Config, error) {
		var rc router.Config
		var err error
		app := &cli.App{Name: "shoal", Flags: []cli.Flag{noAPIKeysFlag, kvIndexBlocksFlag, ejectAfterFlag, holdPrefillTokensFlag, holdPrefillMaxFlag},
			Action: func(c *cli.Context) error { rc, err = routerConfig(c, false); return nil }}
		require.NoError(t, app.Run(append([]string{"shoal"}, args...)))
		return rc, err
	}
	for _, c := range []struct {
		args   []string
		tokens int
		max    time.Duration
		err    string
	}{
		{tokens: router.DefaultHoldPrefillTokens, max: 30 * time.Second},
		{args: []string{"--hold-prefill-tokens", "0"}, tokens: -1, max: 30 * time.Second},
		{args: []string{"--hold-prefill-tokens", "16384", "--hold-prefill-max", "5s"}, tokens: 16384, max: 5 * time.Second},
		{args: []string{"--hold-prefill-tokens", "-1"}, err: "or 0 to never hold"},
		{args: []string{"--hold-prefill-max", "0s"}, err: "give a positive duration"},
	} {
		rc, err := parse(c.args...)
		if c.err != "" {
			require.ErrorContains(t, err, c.err, c.args)
			continue
		}
		require.NoError(t, err, c.args)
		require.Equal(t, c.tokens, rc.HoldPrefillTokens, c.args)
		require.Equal(t, c.max, rc.HoldPrefillMax, c.args)
	}
}
