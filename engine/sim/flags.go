package sim

import (
	"fmt"
	"strconv"
	"strings"
)

// flagSet is an argparse-like parser: --name=value or --name value, booleans
// without a value, and an error naming unknown flags the way argparse does.
type flagSet struct {
	prog    string
	bools   map[string]bool
	known   map[string]bool
	aliases map[string]string
	values  map[string]string
	pos     []string
}

func newFlagSet(prog string, valued, bools []string, aliases map[string]string) *flagSet {
	f := &flagSet{prog: prog, bools: map[string]bool{}, known: map[string]bool{}, aliases: aliases, values: map[string]string{}}
	for _, n := range valued {
		f.known[n] = true
	}
	for _, n := range bools {
		f.known[n] = true
		f.bools[n] = true
	}
	return f
}

func (f *flagSet) parse(args []string) error {
	var unknown []string
	for i := 0; i < len(args); i++ {
		a := args[i]
		if !strings.HasPrefix(a, "-") || a == "-" {
			f.pos = append(f.pos, a)
			continue
		}
		name, val, hasVal := strings.Cut(a, "=")
		if full, ok := f.aliases[name]; ok {
			name = full
		}
		// argparse accepts --max_model_len for --max-model-len.
		name = "--" + strings.ReplaceAll(strings.TrimLeft(name, "-"), "_", "-")
		if !f.known[name] {
			unknown = append(unknown, a)
			if !hasVal && i+1 < len(args) && !strings.HasPrefix(args[i+1], "-") {
				unknown = append(unknown, args[i+1])
				i++
			}
			continue
		}
		if f.bools[name] {
			if hasVal {
				val = strings.ToLower(val)
			} else {
				val = "true"
			}
			f.values[name] = val
			continue
		}
		if !hasVal {
			if i+1 >= len(args) {
				return fmt.Errorf("%s: error: argument %s: expected one argument", f.prog, name)
			}
			i++
			val = args[i]
		}
		f.values[name] = val
	}
	if len(unknown) > 0 {
		return fmt.Errorf("%s: error: unrecognized arguments: %s", f.prog, strings.Join(unknown, " "))
	}
	return nil
}

func (f *flagSet) str(name, def string) string {
	if v, ok := f.values[name]; ok {
		return v
	}
	return def
}

func (f *flagSet) has(name string) bool { _, ok := f.values[name]; return ok }

func (f *flagSet) boolean(name string) bool {
	v := f.values[name]
	return v == "true" || v == "1" || v == "yes"
}

func (f *flagSet) integer(name string, def int) (int, error) {
	v, ok := f.values[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		return 0, fmt.Errorf("%s: error: argument %s: invalid int value: '%s'", f.prog, name, v)
	}
	return n, nil
}

func (f *flagSet) float(name string, def float64) (float64, error) {
	v, ok := f.values[name]
	if !ok {
		return def, nil
	}
	n, err := strconv.ParseFloat(v, 64)
	if err != nil {
		return 0, fmt.Errorf("%s: error: argument %s: invalid float value: '%s'", f.prog, name, v)
	}
	return n, nil
}
