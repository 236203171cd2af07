#!/usr/bin/env bash
# `make test`'s pytest: two sessions at once. The session lab's scenarios (marked kernel)
# keep about a third of the machine's two cores idle while they wait on guests, timeouts
# and I/O; the unit and control-plane tests and the demo (its own lab, marked own_lab) fit
# in that room, beside the background build of the CSI tools that scripts/setup.sh may
# have left running. Each session has its own control plane and temporary folder, and each
# lab its own network namespace, so they share nothing. The lab's session prints to the
# terminal as it goes; the other writes to a log, shown when both are done. Fails if either
# fails.
#   usage: scripts/pytest-streams.sh [PYTEST ARGS...]
set -uo pipefail
cd "$(dirname "$0")/.."
pytest=${PYTEST:-.venv/bin/pytest}
log=$(mktemp "${TMPDIR:-/tmp}/flashmesh-tests.XXXXXX.log")
say() { printf '[tests %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

# A selection of the caller's own (-m) is one session, as asked.
for arg in "$@"; do
  case $arg in -m|-m*) exec "$pytest" "$@" ;; esac
done

say "the unit and control-plane tests and the demo run alongside the lab's scenarios (log: $log)"
"$pytest" -m "not kernel or own_lab" "$@" >"$log" 2>&1 &
others=$!
# Whatever ends this script ends the background session too.
trap 'kill "$others" 2>/dev/null || true' EXIT INT TERM

"$pytest" -m "kernel and not own_lab" "$@"
lab_rc=$?
wait "$others"
others_rc=$?
trap - EXIT INT TERM

say "the unit and control-plane tests and the demo (exit $others_rc):"
cat "$log"
rm -f "$log"
# 5 is pytest's "no tests collected" (for instance, -k chose none of a session's tests).
ok() { [ "$1" = 0 ] || [ "$1" = 5 ]; }
if ok "$lab_rc" && ok "$others_rc" && ! { [ "$lab_rc" = 5 ] && [ "$others_rc" = 5 ]; }; then
  exit 0
fi
say "FAILED: the lab's scenarios exit $lab_rc, the unit and control-plane tests and the demo exit $others_rc"
exit 1
