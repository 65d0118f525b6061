package model

import (
	"fmt"
	"path"
	"strings"
)

// Filter selects files from a listing. A file is kept when its name has one
// of Suffixes (none means any), matches one of Include (none means any), and
// matches none of Exclude. Globs use path.Match and are tried against the
// whole relative name and against its base name.
type Filter struct {
	// Suffixes are extensions with or without the dot ("json", ".py"). They
	// match the file's extension, so "py" keeps model.py and not copy.
	Suffixes []string
	Include  []string
	Exclude  []string
}

// Check reports the first malformed glob.
func (f Filter) Check() error {
	for _, g := range append(append([]string{}, f.Include...), f.Exclude...) {
		if _, err := path.Match(g, ""); err != nil {
			return fmt.Errorf("glob %q: %w", g, err)
		}
	}
	for _, s := range f.Suffixes {
		if strings.Trim(s, ". ") == "" || strings.ContainsAny(s, "/*?[") {
			return fmt.Errorf("suffix %q: want an extension such as json or .safetensors", s)
		}
	}
	return nil
}

// Match says whether name is selected.
func (f Filter) Match(name string) bool {
	if len(f.Suffixes) > 0 {
		ok := false
		for _, s := range f.Suffixes {
			s = "." + strings.TrimPrefix(strings.TrimSpace(s), ".")
			// ".tar.gz" style suffixes match the end of the name after a dot.
			ok = ok || strings.HasSuffix(path.Base(name), s) && len(path.Base(name)) > len(s)
		}
		if !ok {
			return false
		}
	}
	if len(f.Include) > 0 && !globAny(f.Include, name) {
		return false
	}
	return !globAny(f.Exclude, name)
}

func globAny(globs []string, name string) bool {
	for _, g := range globs {
		if ok, _ := path.Match(g, name); ok {
			return true
		}
		if ok, _ := path.Match(g, path.Base(name)); ok {
			return true
		}
	}
	return false
}
