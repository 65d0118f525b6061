#!/usr/bin/env bash
# Runs every fuzz target of the module for FUZZTIME each (default 5s).
# A target fails on a real finding (a failing input written, a panic, a test
# error). A bare "context deadline exceeded" at the end of the time window,
# with no failing input, is Go 1.26's fuzz-coordinator shutdown race
# (go.dev/issue/75804, fixed in Go 1.27): that target runs again, up to three
# times in all; a third such failure fails it.
set -uo pipefail
cd "$(dirname "$0")/.."
GO=${GO:-go}
FUZZTIME=${FUZZTIME:-5s}
failed=()
for pkg in $($GO list ./...); do
  for f in $($GO test -list '^Fuzz' "$pkg" 2>/dev/null | grep '^Fuzz' || true); do
    for try in 1 2 3; do
      echo "== fuzz $f ($pkg, $FUZZTIME)"
      out=$($GO test -run '^$' -fuzz "^${f}\$" -fuzztime "$FUZZTIME" "$pkg" 2>&1)
      rc=$?
      grep -v '^fuzz: elapsed' <<<"$out"
      [ $rc -eq 0 ] && break
      if [ $try -lt 3 ] && grep -q 'context deadline exceeded' <<<"$out" &&
        ! grep -q -e 'Failing input written' -e 'panic:' -e '_test.go:[0-9]*:' <<<"$out"; then
        echo "   no failing input: go.dev/issue/75804 (fuzz coordinator shutdown race); again"
        continue
      fi
      failed+=("$f")
      break
    done
  done
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz targets that failed: ${failed[*]}"
  exit 1
fi
