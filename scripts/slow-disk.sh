#!/usr/bin/env bash
# Runs a command with reads from FILE's disk throttled to BYTES per second
# (root only; cgroup v1 blkio.throttle or cgroup v2 io.max). O_DIRECT reads
# are throttled as any others. The page cache is dropped first.
#   scripts/slow-disk.sh 30M FILE -- hypura run FILE --prompt hi
set -euo pipefail
rate="$1"; file="$2"; shift 2
[ "${1:-}" = "--" ] && shift
bps=$(python3 -c "import sys;s=sys.argv[1].upper();m={'K':1<<10,'M':1<<20,'G':1<<30}; print(int(float(s[:-1])*m[s[-1]]) if s[-1] in m else int(s))" "$rate")
# The filesystem's device; a partition is throttled through its disk.
dev=$(stat -c '%d' "$file")
majmin="$((dev >> 8)):$((dev & 255))"
if [ -e "/sys/dev/block/$majmin/partition" ]; then
  majmin=$(cat "/sys/dev/block/$majmin/../dev")
fi
name="hypura-slow-$$"
if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
  dir="/sys/fs/cgroup/$name"; mkdir "$dir"
  echo "$majmin rbps=$bps" > "$dir/io.max"
else
  dir="/sys/fs/cgroup/blkio/$name"; mkdir "$dir"
  echo "$majmin $bps" > "$dir/blkio.throttle.read_bps_device"
fi
cleanup() { sleep 0.2; rmdir "$dir" 2>/dev/null || true; }
trap cleanup EXIT
sync; echo 1 > /proc/sys/vm/drop_caches 2>/dev/null || true
bash -c 'echo $$ > "$0/cgroup.procs"; shift; exec "$@"' "$dir" _ "$@"
