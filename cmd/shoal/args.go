package main

import "strings"

// valueFlags take a value in the next argument.
var valueFlags = map[string]bool{"-o": true, "--output": true, "--coordinator": true, "-f": true, "--filename": true,
	"--node": true, "--name": true, "--tail": true, "--dir": true, "--suffix": true, "--include": true, "--exclude": true,
	"--workers": true, "--part-size": true, "--limit-rate": true, "--s3-endpoint": true, "--s3-path-style": true, "--hf-endpoint": true}

// interspersed lets users put flags after positional arguments, as with
// kubectl (`shoal get replicas demo -o json`): urfave/cli v2 stops parsing
// flags at the first positional one, so for the CLI verbs the flags that
// follow positionals are moved in front of them.
func interspersed(args []string) []string {
	if len(args) < 2 {
		return args
	}
	i := 1
	for i < len(args) && strings.HasPrefix(args[i], "-") { // global flags
		if args[i] == "--log-level" {
			i++
		}
		i++
	}
	if i >= len(args) {
		return args
	}
	verb := args[i]
	start := i + 1
	switch verb {
	case "get", "model":
		start++ // keep the kind (nodes, replicas, …) as the subcommand
	case "describe", "delete", "apply", "logs":
	default:
		return args
	}
	if start > len(args) {
		return args
	}
	var flags, pos []string
	for j := start; j < len(args); j++ {
		a := args[j]
		if a == "--" {
			pos = append(pos, args[j:]...)
			break
		}
		if strings.HasPrefix(a, "-") && len(a) > 1 {
			flags = append(flags, a)
			if valueFlags[a] && j+1 < len(args) {
				flags = append(flags, args[j+1])
				j++
			}
			continue
		}
		pos = append(pos, a)
	}
	out := append([]string{}, args[:start]...)
	out = append(out, flags...)
	return append(out, pos...)
}
