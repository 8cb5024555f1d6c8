# Sourced by scripts/*: `with_heartbeat WHAT COMMAND...` runs COMMAND and prints a line every
# HEARTBEAT_S seconds (default 5) while it runs, so a long quiet step (pip, initdb, a seed's large
# INSERTs) never leaves the screen or a log silent. Returns COMMAND's exit status.
with_heartbeat() {
  local what="$1"
  shift
  local started=$SECONDS every="${HEARTBEAT_S:-5}"
  (
    nap=""
    trap 'kill $nap 2>/dev/null; exit 0' TERM # `wait` returns at once on TERM; a foreground sleep would not
    while :; do
      sleep "$every" &
      nap=$!
      wait "$nap"
      echo "   ... $what ($((SECONDS - started)) s)"
    done
  ) &
  local beat=$! rc=0
  "$@" || rc=$?
  kill "$beat" 2>/dev/null || true
  wait "$beat" 2>/dev/null || true
  return "$rc"
}
