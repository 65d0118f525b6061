package main

import (
	"fmt"
	"io"
	"reflect"
	"sort"
	"strings"

	"github.com/shoalhq/shoal/agent"
	"github.com/urfave/cli/v2"
)

// genDocsCommand writes docs/reference.md: every daemon's flags with their
// environment variables and defaults, and the agent config file's keys, from
// the code itself (a test fails when the file is stale: `make docs`).
func genDocsCommand() *cli.Command {
	return &cli.Command{
		Name:   "gen-docs",
		Hidden: true,
		Usage:  "print the configuration reference (docs/reference.md)",
		Action: func(c *cli.Context) error {
			writeReference(c.App.Writer, c.App)
			return nil
		},
	}
}

func writeReference(w io.Writer, app *cli.App) {
	fmt.Fprintln(w, "# Configuration reference")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Generated from the code by `shoal gen-docs` (`make docs`); do not edit by hand.")
	fmt.Fprintln(w, "Every flag can also be set by the environment variable shown. The agent also reads")
	fmt.Fprintln(w, "a YAML file (`--config`, packaged as /etc/shoal/agent.yaml); flags override it.")
	paths := [][]string{{"agent"}, {"coordinator"}, {"router"}, {"model", "pull"}, {"tls", "cert", "create"}, {"apikey", "create"}, {"dev"}}
	for _, p := range paths {
		cmd := find(app.Commands, p)
		if cmd == nil {
			continue
		}
		fmt.Fprintf(w, "\n## shoal %s\n\n%s\n\n", strings.Join(p, " "), cmd.Usage)
		fmt.Fprintln(w, "| flag | environment | default | meaning |")
		fmt.Fprintln(w, "|---|---|---|---|")
		flags := append([]cli.Flag{}, cmd.Flags...)
		sort.SliceStable(flags, func(i, j int) bool { return flags[i].Names()[0] < flags[j].Names()[0] })
		for _, f := range flags {
			df, ok := f.(cli.DocGenerationFlag)
			if !ok {
				continue
			}
			env := strings.Join(df.GetEnvVars(), ", ")
			def := df.GetDefaultText()
			if def == "" {
				def = df.GetValue()
			}
			fmt.Fprintf(w, "| `--%s` | %s | %s | %s |\n", f.Names()[0], code(env), code(def), strings.ReplaceAll(df.GetUsage(), "|", "\\|"))
		}
	}
	fmt.Fprintln(w, "\n## Agent config file keys\n\n| key | type |\n|---|---|")
	walkYAML(w, reflect.TypeOf(agent.Config{}), "")
}

func code(s string) string {
	if s == "" || s == `""` {
		return ""
	}
	return "`" + s + "`"
}

func find(cmds []*cli.Command, path []string) *cli.Command {
	for _, c := range cmds {
		if c.Name == path[0] {
			if len(path) == 1 {
				return c
			}
			return find(c.Subcommands, path[1:])
		}
	}
	return nil
}

func walkYAML(w io.Writer, t reflect.Type, prefix string) {
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if tag == "" || tag == "-" || !f.IsExported() {
			continue
		}
		if f.Type.Kind() == reflect.Struct && f.Type.PkgPath() != "time" {
			walkYAML(w, f.Type, prefix+tag+".")
			continue
		}
		fmt.Fprintf(w, "| `%s%s` | %s |\n", prefix, tag, f.Type.String())
	}
}
