#!/usr/bin/env bash
# `make test`'s pytest: two streams at once. The lab's scenarios keep about a third of the
# machine's two cores idle while they wait on guests, timeouts and I/O, so they are split
# over two session labs that run side by side:
#   first stream:  the first lab's scenarios (marked kernel, not second_lab);
#   second stream: the unit and control-plane tests and the demo (its own lab, marked
#                  own_lab), then the second lab's scenarios (marked second_lab).
# Both share the machine with the background build of the CSI tools that scripts/setup.sh
# may have left running. Each session has its own control plane and temporary folder, and
# each lab its own network namespace, so they share nothing. The first stream prints to the
# terminal as it goes; the second writes to a log, shown when both are done (a line here
# says when each of its sessions starts and ends). Fails if any session fails.
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

say "the unit and control-plane tests, the demo, then the second lab's scenarios run alongside the first lab's (log: $log)"
(
  # Ends the session running now when this stream is ended.
  trap 'kill "$session" 2>/dev/null; exit 143' TERM
  "$pytest" -m "not kernel or own_lab" "$@" >"$log" 2>&1 &
  session=$!
  wait "$session"
  unit_rc=$?
  say "the unit and control-plane tests and the demo: exit $unit_rc; the second lab's scenarios start"
  "$pytest" -m "kernel and second_lab" "$@" >>"$log" 2>&1 &
  session=$!
  wait "$session"
  lab2_rc=$?
  say "the second lab's scenarios: exit $lab2_rc"
  # 5 is pytest's "no tests collected" (for instance, -k chose none of a session's tests).
  if [ "$unit_rc" = 5 ] && [ "$lab2_rc" = 5 ]; then exit 5; fi
  for rc in "$unit_rc" "$lab2_rc"; do [ "$rc" = 0 ] || [ "$rc" = 5 ] || exit 1; done
  exit 0
) &
others=$!
# Whatever ends this script ends the background stream too.
trap 'kill "$others" 2>/dev/null || true' EXIT INT TERM

"$pytest" -m "kernel and not own_lab and not second_lab" "$@"
lab_rc=$?
wait "$others"
others_rc=$?
trap - EXIT INT TERM

say "the second stream: the unit and control-plane tests, the demo and the second lab (exit $others_rc):"
cat "$log"
rm -f "$log"
# 5 is pytest's "no tests collected" (for instance, -k chose none of a session's tests).
ok() { [ "$1" = 0 ] || [ "$1" = 5 ]; }
if ok "$lab_rc" && ok "$others_rc" && ! { [ "$lab_rc" = 5 ] && [ "$others_rc" = 5 ]; }; then
  exit 0
fi
say "FAILED: the first lab's scenarios exit $lab_rc, the second stream exit $others_rc"
exit 1
