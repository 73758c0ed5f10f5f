#!/usr/bin/env bash
# Runs a command inside a fresh memory cgroup with the given limit (root only).
#   scripts/in-cgroup.sh 1G -- hypura run model.gguf --prompt hi
#   PEAK=1 scripts/in-cgroup.sh ...   (also prints the peak memory use)
# Works with cgroup v2 (memory.max) and v1 (memory.limit_in_bytes); swap is
# disallowed too where the controller offers it. The page cache counts against
# the limit, as it does for any process in a container.
set -euo pipefail
limit="$1"; shift
[ "${1:-}" = "--" ] && shift
bytes=$(python3 -c "import sys;s=sys.argv[1].upper();m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s))" "$limit")
name="hypura-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  dir="/sys/fs/cgroup/$name"; mkdir "$dir"
  echo "$bytes" > "$dir/memory.max"
  [ -f "$dir/memory.swap.max" ] && echo 0 > "$dir/memory.swap.max"
else
  dir="/sys/fs/cgroup/memory/$name"; mkdir "$dir"
  echo "$bytes" > "$dir/memory.limit_in_bytes"
  [ -f "$dir/memory.memsw.limit_in_bytes" ] && echo "$bytes" > "$dir/memory.memsw.limit_in_bytes" || true
fi
# PEAK=1: print the cgroup's peak memory use (anon + page cache) at the end.
cleanup() {
  if [ -n "${PEAK:-}" ]; then
    f="$dir/memory.peak"; [ -f "$f" ] || f="$dir/memory.max_usage_in_bytes"
    [ -f "$f" ] && echo "cgroup peak: $(( $(cat "$f") >> 20 )) MiB" >&2
  fi
  sleep 0.2; rmdir "$dir" 2>/dev/null || true
}
trap cleanup EXIT
# Start cold: drop clean page cache so earlier runs do not help this one.
sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true
bash -c 'echo $$ > "$0/cgroup.procs"; shift; exec "$@"' "$dir" _ "$@"
