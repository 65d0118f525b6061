package main

import (
	"strings"

	"github.com/urfave/cli/v2"
)

// reorder lets users write a flag anywhere on the command line, as with
// kubectl (`shoal get replicas demo -o json`, `shoal --tls-dir D get
// replicas`): urfave/cli v2 reads a command's flags only right after its
// name and stops at the first positional argument. Each flag is moved to
// the command that defines it (the deepest one, else the app), whether it
// takes a value is read from its definition (every flag but a BoolFlag
// does), and positional arguments keep their order after the last command.
// A flag written before its verb is read with the definition every command
// gives its name; where they differ (tls cert create --coordinator is a
// switch, get --coordinator takes an address), a following command name
// makes it a switch. A flag no command defines is left for urfave to
// report. Everything after "--" is positional.
func reorder(app *cli.App, args []string) []string {
	if len(args) < 2 {
		return args
	}
	var path []*cli.Command
	var typed []string // each command as the user wrote it (an alias stays an alias)
	var items []item
	cmds := app.Commands
	for i := 1; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			items = append(items, item{tok: args[i:]})
			break
		}
		if isFlag(a) {
			name, inline := flagName(a)
			it := item{tok: []string{a}, name: name, inline: inline}
			if !inline && i+1 < len(args) && valued(app, path, name, cmds, args[i+1]) {
				it.tok = append(it.tok, args[i+1])
				i++
			}
			items = append(items, it)
			continue
		}
		if c := findCommand(cmds, a); c != nil && !hasPositional(items) {
			path, typed = append(path, c), append(typed, a)
			cmds = c.Subcommands
			continue
		}
		items = append(items, item{tok: []string{a}})
	}
	levels := make([][]string, len(path)+1)
	var pos, dangling []string
	inner := app.Commands
	if len(path) > 0 {
		inner = path[len(path)-1].Subcommands
	}
	for _, it := range items {
		if it.name == "" {
			pos = append(pos, it.tok...)
			continue
		}
		lvl, f := definedAt(app, path, it.name)
		if f == nil {
			lvl = len(path) // unknown: let the innermost command say so
		}
		// Where it lands, does the flag take a value? Decide as the parse
		// of the result will, so that reordering again changes nothing: a
		// value it does not take becomes a positional; a value it takes
		// but lacks leaves it last, where nothing follows it (the parser
		// then says what is missing).
		wants := valued(app, path, it.name, inner, "")
		if f != nil {
			wants = takesValue(f)
		}
		switch {
		case len(it.tok) == 2 && !wants:
			pos = append(pos, it.tok[1])
			it.tok = it.tok[:1]
		case len(it.tok) == 1 && !it.inline && wants:
			dangling = append(dangling, it.tok[0])
			continue
		}
		levels[lvl] = append(levels[lvl], it.tok...)
	}
	out := append([]string{args[0]}, levels[0]...)
	for i := range path {
		out = append(out, typed[i])
		out = append(out, levels[i+1]...)
	}
	return append(append(out, pos...), dangling...)
}

// item is one flag (with its value) or positional argument.
type item struct {
	tok    []string
	name   string // flag name; "" for a positional
	inline bool   // --name=value
}

func hasPositional(items []item) bool {
	for _, it := range items {
		if it.name == "" {
			return true
		}
	}
	return false
}

// valued decides whether flag name, met with path so far and cmds next,
// takes next as its value.
func valued(app *cli.App, path []*cli.Command, name string, cmds []*cli.Command, next string) bool {
	if _, f := definedAt(app, path, name); f != nil && len(cmds) == 0 {
		return takesValue(f) // the command is known: its definition decides
	}
	defs := allDefinitions(app, name)
	if len(defs) == 0 {
		return false
	}
	agree := true
	for _, f := range defs[1:] {
		agree = agree && takesValue(f) == takesValue(defs[0])
	}
	if agree {
		return takesValue(defs[0])
	}
	return findCommand(cmds, next) == nil
}

func isFlag(a string) bool { return len(a) > 1 && a[0] == '-' }

// flagName is the flag's name without dashes and value; inline says the
// value came with it (--name=value).
func flagName(a string) (string, bool) {
	name, _, inline := strings.Cut(strings.TrimLeft(a, "-"), "=")
	return name, inline
}

func matches(c *cli.Command, name string) bool {
	if c.Name == name {
		return true
	}
	for _, al := range c.Aliases {
		if al == name {
			return true
		}
	}
	return false
}

func findCommand(cmds []*cli.Command, name string) *cli.Command {
	for _, c := range cmds {
		if matches(c, name) {
			return c
		}
	}
	return nil
}

func hasName(f cli.Flag, name string) bool {
	for _, n := range f.Names() {
		if n == name {
			return true
		}
	}
	return false
}

func findFlag(fs []cli.Flag, name string) cli.Flag {
	if name == "h" || name == "help" {
		return cli.HelpFlag
	}
	for _, f := range fs {
		if hasName(f, name) {
			return f
		}
	}
	return nil
}

// definedAt is the deepest level of path (0 for the app) that defines name.
func definedAt(app *cli.App, path []*cli.Command, name string) (int, cli.Flag) {
	for i := len(path) - 1; i >= 0; i-- {
		if f := findFlag(path[i].Flags, name); f != nil {
			return i + 1, f
		}
	}
	return 0, findFlag(app.Flags, name)
}

// allDefinitions are the flags named name on the app and every command.
func allDefinitions(app *cli.App, name string) []cli.Flag {
	var out []cli.Flag
	if f := findFlag(app.Flags, name); f != nil {
		out = append(out, f)
	}
	var walk func([]*cli.Command)
	walk = func(cs []*cli.Command) {
		for _, c := range cs {
			if f := findFlag(c.Flags, name); f != nil {
				out = append(out, f)
			}
			walk(c.Subcommands)
		}
	}
	walk(app.Commands)
	return out
}

// takesValue: every flag but a boolean one is followed by its value.
func takesValue(f cli.Flag) bool {
	if f == nil {
		return false
	}
	_, isBool := f.(*cli.BoolFlag)
	return !isBool
}
