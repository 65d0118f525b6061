package main

import (
	"fmt"
	"io"
	"reflect"
	"sort"
	"strings"

	"github.com/shoalhq/shoal/agent"
	"github.com/shoalhq/shoal/spec"
	"github.com/urfave/cli/v2"
)

// genDocsCommand writes docs/reference.md: every command's flags with their
// environment variables and defaults, the agent config file's keys and the
// deployment spec's, from the code itself (a test fails when the file is stale: `make docs`).
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
	fmt.Fprintln(w, "Every command of the binary (the daemons, then the CLI's verbs) with its flags; every")
	fmt.Fprintln(w, "flag can also be set by the environment variable shown. The agent also reads a YAML")
	fmt.Fprintln(w, "file (`--config`, packaged as /etc/shoal/agent.yaml); flags override it. The deployment")
	fmt.Fprintln(w, "spec's keys and the agent config file's keys close the page.")
	// Every command (daemons first, then the CLI's verbs), each with its flags.
	var walk func(cmds []*cli.Command, prefix []string)
	var all [][]string
	walk = func(cmds []*cli.Command, prefix []string) {
		for _, c := range cmds {
			if c.Hidden || c.Name == "help" {
				continue
			}
			p := append(append([]string{}, prefix...), c.Name)
			if c.Action != nil {
				all = append(all, p)
			}
			walk(c.Subcommands, p)
		}
	}
	walk(app.Commands, nil)
	daemons := map[string]int{"agent": 0, "coordinator": 1, "router": 2}
	sort.SliceStable(all, func(i, j int) bool {
		di, iok := daemons[strings.Join(all[i], " ")]
		dj, jok := daemons[strings.Join(all[j], " ")]
		switch {
		case iok && jok:
			return di < dj
		case iok != jok:
			return iok
		}
		return strings.Join(all[i], " ") < strings.Join(all[j], " ")
	})
	for _, p := range all {
		cmd := find(app.Commands, p)
		fmt.Fprintf(w, "\n## shoal %s\n\n%s\n", strings.Join(p, " "), cmd.Usage)
		if cmd.ArgsUsage != "" {
			fmt.Fprintf(w, "\n`shoal %s %s`\n", strings.Join(p, " "), cmd.ArgsUsage)
		}
		flags := append([]cli.Flag{}, cmd.Flags...)
		if len(flags) == 0 {
			continue
		}
		fmt.Fprintln(w, "\n| flag | environment | default | meaning |")
		fmt.Fprintln(w, "|---|---|---|---|")
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
	fmt.Fprintln(w, "\n## Deployment spec keys\n\nThe YAML `shoal apply -f` takes (`spec/spec.go` documents each; `shoal describe deployment` shows them with their defaults).\n\n| key | type |\n|---|---|")
	walkYAML(w, reflect.TypeOf(spec.Deployment{}), "")
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
	if t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	for i := 0; i < t.NumField(); i++ {
		f := t.Field(i)
		tag := strings.Split(f.Tag.Get("yaml"), ",")[0]
		if tag == "" || tag == "-" || !f.IsExported() {
			continue
		}
		ft := f.Type
		if ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		if ft.Kind() == reflect.Struct && ft.PkgPath() != "time" {
			walkYAML(w, ft, prefix+tag+".")
			continue
		}
		fmt.Fprintf(w, "| `%s%s` | %s |\n", prefix, tag, ft.String())
	}
}
