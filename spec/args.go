package spec

import (
	"fmt"
	"slices"
	"strings"
)

// ArgValue is the value of a flag in engine arguments as vLLM's parser
// reads them: --name value or --name=value, underscores as dashes, the last
// one given winning.
func ArgValue(args []string, flag string) (string, bool) {
	var v string
	found := false
	for i := 0; i < len(args); i++ {
		name, val, has := strings.Cut(args[i], "=")
		if strings.ReplaceAll(name, "_", "-") != flag {
			continue
		}
		if !has {
			if i+1 >= len(args) {
				continue
			}
			val = args[i+1]
		}
		v, found = val, true
	}
	return v, found
}

// refuseOwned names each engine arg that sets one of flags, which the
// plan sets from the spec fields from (vLLM's spelling: underscores read
// as dashes, and --flag.key sets part of flag).
func refuseOwned(args, flags []string, from string) []error {
	var errs []error
	for i, a := range args {
		name, _, _ := strings.Cut(a, "=")
		base, _, _ := strings.Cut(strings.ReplaceAll(name, "_", "-"), ".")
		if slices.Contains(flags, base) {
			errs = append(errs, &Error{Field: fmt.Sprintf("engine.args[%d]", i), Msg: name + " is set by shoal from " + from + "; set it there"})
		}
	}
	return errs
}
