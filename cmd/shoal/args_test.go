package main

import (
	"fmt"
	"io"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/urfave/cli/v2"
)

func TestReorder(t *testing.T) {
	app := newApp()
	for _, c := range []struct{ in, want string }{
		{"shoal get replicas demo -o json", "shoal get replicas -o json demo"},
		{"shoal get replicas -o json demo", "shoal get replicas -o json demo"},
		{"shoal get -o json replicas demo", "shoal get replicas -o json demo"},
		// The bug: a global-position --tls-dir hid the verb, and --coordinator after a positional was dropped.
		{"shoal --tls-dir D get replicas demo --coordinator 127.0.0.1:1", "shoal get replicas --tls-dir D --coordinator 127.0.0.1:1 demo"},
		{"shoal --log-level debug describe deployment x --coordinator h:1", "shoal --log-level debug describe --coordinator h:1 deployment x"},
		{"shoal describe deployment x --log-level=debug --insecure", "shoal --log-level=debug describe --insecure deployment x"},
		{"shoal delete deployment x", "shoal delete deployment x"},
		{"shoal agent --address 1.2.3.4 --stop-engines-on-exit --gpus 0", "shoal agent --address 1.2.3.4 --stop-engines-on-exit --gpus 0"},
		{"shoal logs demo-1 -F --tail 100 --node node-2", "shoal logs -F --tail 100 --node node-2 demo-1"},
		{"shoal model pull s3://b/m --dir /models/m --suffix json", "shoal model pull --dir /models/m --suffix json s3://b/m"},
		{"shoal keyring install KEY --insecure", "shoal keyring install --insecure KEY"},
		{"shoal apply -f - --coordinator=h:1", "shoal apply -f - --coordinator=h:1"},
		{"shoal get replicas -- -o", "shoal get replicas -- -o"},
		{"shoal get replicas --bogus x", "shoal get replicas --bogus x"},
		{"shoal get", "shoal get"},
		{"shoal", "shoal"},
	} {
		require.Equal(t, c.want, strings.Join(reorder(app, strings.Fields(c.in)), " "), c.in)
	}
}

// recording replaces every action of app with one that saves the command
// it ran and its context.
func recording(app *cli.App) (*cli.Context, *string) {
	var got cli.Context
	var ran string
	var walk func(prefix string, cs []*cli.Command)
	walk = func(prefix string, cs []*cli.Command) {
		for _, c := range cs {
			name := strings.TrimSpace(prefix + " " + c.Name)
			c.Action = func(ctx *cli.Context) error { got, ran = *ctx, name; return nil }
			c.Before, c.After = nil, nil
			walk(name, c.Subcommands)
		}
	}
	walk("", app.Commands)
	app.Writer, app.ErrWriter = io.Discard, io.Discard
	app.ExitErrHandler = func(*cli.Context, error) {}
	return &got, &ran
}

func TestCoordinatorFlagIsNeverDropped(t *testing.T) {
	for _, args := range []string{
		"shoal --tls-dir D get replicas demo --coordinator 127.0.0.1:1",
		"shoal get replicas demo --coordinator 127.0.0.1:1 --tls-dir D",
		"shoal --coordinator 127.0.0.1:1 --tls-dir=D delete deployment demo",
		"shoal delete deployment demo --tls-dir D --coordinator=127.0.0.1:1",
	} {
		app := newApp()
		got, _ := recording(app)
		require.NoError(t, app.Run(reorder(app, strings.Fields(args))), args)
		require.Equal(t, "127.0.0.1:1", got.String("coordinator"), args)
		require.Equal(t, "D", got.String("tls-dir"), args)
	}
}

// sample is a value a flag of f's type accepts, and how it reads back.
func sample(f cli.Flag) (arg, want string) {
	switch f.(type) {
	case *cli.BoolFlag:
		return "", "true"
	case *cli.IntFlag, *cli.Int64Flag, *cli.UintFlag, *cli.Uint64Flag:
		return "7", "7"
	case *cli.Float64Flag:
		return "1.5", "1.5"
	case *cli.DurationFlag:
		return "3s", "3s"
	case *cli.StringSliceFlag:
		return "x1", "[x1]"
	case *cli.IntSliceFlag:
		return "3", "[3]"
	}
	return "v1", "v1"
}

func valueOf(c *cli.Context, f cli.Flag) string {
	name := f.Names()[0]
	switch f.(type) {
	case *cli.StringSliceFlag:
		return fmt.Sprint(c.StringSlice(name))
	case *cli.IntSliceFlag:
		return fmt.Sprint(c.IntSlice(name))
	}
	return fmt.Sprint(c.Value(name))
}

// TestEveryFlagParsesWhereverItIsWritten walks every command and every
// flag: written right after the command, after a positional argument, or
// before the verb, each flag reaches its command with its value.
func TestEveryFlagParsesWhereverItIsWritten(t *testing.T) {
	type leaf struct {
		path []string
		cmd  *cli.Command
	}
	var leaves []leaf
	var walk func(path []string, cs []*cli.Command)
	walk = func(path []string, cs []*cli.Command) {
		for _, c := range cs {
			p := append(append([]string(nil), path...), c.Name)
			if len(c.Subcommands) > 0 {
				walk(p, c.Subcommands)
			}
			if c.Action != nil || len(c.Subcommands) == 0 {
				leaves = append(leaves, leaf{p, c})
			}
		}
	}
	walk(nil, newApp().Commands)
	n := 0
	for _, l := range leaves {
		for _, f := range l.cmd.Flags {
			name := f.Names()[0]
			var required []string // the command's other required flags
			for _, rf := range l.cmd.Flags {
				if r, ok := rf.(cli.RequiredFlag); ok && r.IsRequired() && rf.Names()[0] != name {
					arg, _ := sample(rf)
					required = append(required, "--"+rf.Names()[0], arg)
				}
			}
			arg, want := sample(f)
			tok := []string{"--" + name}
			if arg != "" {
				tok = append(tok, arg)
			}
			for where, args := range map[string][]string{
				"after the command":  append(append(append([]string{"shoal"}, l.path...), tok...), "pos"),
				"after a positional": append(append(append([]string{"shoal"}, l.path...), "pos"), tok...),
				"before the verb":    append(append(append([]string{"shoal"}, tok...), l.path...), "pos"),
			} {
				args = append(args, required...)
				app := newApp()
				got, ran := recording(app)
				err := app.Run(reorder(app, args))
				desc := fmt.Sprintf("%s --%s %s: %v", strings.Join(l.path, " "), name, where, args)
				require.NoError(t, err, desc)
				require.Equal(t, strings.Join(l.path, " "), *ran, desc)
				require.True(t, got.IsSet(name), desc)
				require.Equal(t, want, valueOf(got, f), desc)
				require.Equal(t, "pos", got.Args().First(), desc)
				n++
			}
		}
	}
	require.Greater(t, n, 300, "every flag of every command was tried")
}

// Every verb that talks to a cluster takes the coordinator and the CLI's
// credentials (the error that says to pass --insecure must name a flag the
// verb accepts).
func TestClusterVerbsTakeClusterFlags(t *testing.T) {
	app := newApp()
	for _, path := range [][]string{{"apply"}, {"get", "nodes"}, {"get", "deployments"}, {"get", "replicas"}, {"describe"}, {"delete"}, {"logs"},
		{"keyring", "list"}, {"keyring", "install"}, {"keyring", "use"}, {"keyring", "remove"}} {
		cs := app.Commands
		var c *cli.Command
		for _, p := range path {
			c = findCommand(cs, p)
			require.NotNil(t, c, path)
			cs = c.Subcommands
		}
		for _, f := range []string{"coordinator", "tls-dir", "token", "insecure"} {
			require.NotNil(t, findFlag(c.Flags, f), "%v lacks --%s", path, f)
		}
	}
}

// FuzzReorder: any command line is reordered without a panic into a
// permutation of its own arguments (nothing lost, nothing made up), and
// reordering is idempotent.
func FuzzReorder(f *testing.F) {
	for _, s := range []string{"get replicas demo -o json", "--tls-dir D get replicas demo --coordinator 127.0.0.1:1",
		"tls cert create --coordinator --name c --ip 1.2.3.4", "--coordinator tls cert create", "logs -- -x", "-", "--", "get -o"} {
		f.Add(s)
	}
	app := newApp()
	f.Fuzz(func(t *testing.T, line string) {
		args := append([]string{"shoal"}, strings.Fields(line)...)
		out := reorder(app, args)
		count := func(l []string) map[string]int {
			m := map[string]int{}
			for _, a := range l {
				m[a]++
			}
			return m
		}
		require.Equal(t, count(args), count(out), "%q → %q", args, out)
		require.Equal(t, out, reorder(app, out), "reordering twice changes nothing")
	})
}
