#!/usr/bin/env python3
"""Two Hypura binaries side by side: `hypura run ... --json` with each in
turn (A B A B ...), so drift on a noisy machine hits both alike; prints the
median generation and prompt tok/s of each and the median of the pairwise
ratios A/B.

    scripts/ab-tps.py OLD_BIN NEW_BIN ROUNDS -- MODEL --prompt TEXT -n 64 --temp 0 ...
"""
import json
import statistics
import subprocess
import sys


def run(binary, args):
    p = subprocess.run([binary, "run", *args, "--json"], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{binary} failed: {p.stderr.strip()[-400:]}")
    line = [l for l in p.stderr.splitlines() if l.startswith("{")][-1]
    return json.loads(line)


def main():
    a_bin, b_bin, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1:]
    run(a_bin, args), run(b_bin, args)  # warm-up (page cache, profile)
    rows = {"a": [], "b": []}
    for _ in range(rounds):
        rows["a"].append(run(a_bin, args))
        rows["b"].append(run(b_bin, args))
    for key in ("gen_tps", "prompt_tps"):
        a = [r[key] for r in rows["a"]]
        b = [r[key] for r in rows["b"]]
        ratio = statistics.median(x / y for x, y in zip(a, b) if y > 0)
        print(f"{key}: A median {statistics.median(a):.2f}  B median {statistics.median(b):.2f}  A/B {ratio:.3f} (pairs {len(a)})")
    rb = [r.get("read_bytes_per_token") for r in rows["b"]]
    if rb[0] is not None:
        ra = [r.get("read_bytes_per_token") for r in rows["a"]]
        print(f"read/token: A {statistics.median(ra)/2**20:.1f} MiB  B {statistics.median(rb)/2**20:.1f} MiB")


if __name__ == "__main__":
    main()
