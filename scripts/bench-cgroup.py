#!/usr/bin/env python3
"""llama.cpp's mmap path against Hypura's default plan in one memory cgroup,
rounds alternating (mmap, Hypura, mmap, Hypura, ...) so that the disk's drift
hits both alike. Root only (scripts/in-cgroup.sh makes the cgroup and drops
the page cache before every run).

    scripts/bench-cgroup.py MODEL LIMIT ROUNDS TOKENS [--temp T] [--hypura BIN] [--ab VAR=VALUE] [--no-mmap]

"mmap" is `hypura run --mode resident --load-mode mmap --no-repack`
(llama.cpp's own loader and page cache); "hypura" is `hypura run` with no
placement flags. Round r uses --seed r for both. Prints one line per run and
then the medians, the ratio hypura/mmap per round, and per round Hypura's
ceiling for the bytes it actually read per token (the sequential disk rate,
the mean of `profile --quick` before and after the round, ÷ read bytes per
token) with the fraction of it reached. `--ab VAR=VALUE` adds
a third run to every round, Hypura with that environment variable set (e.g.
HYPURA_NO_PREGATE=1), and prints hypura / that run per round; `--no-mmap`
leaves the mmap runs out (an A/B of Hypura alone).
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Once upon a time"


def run(binary, model, limit, tokens, temp, seed, extra, env=None):
    cmd = [
        "bash", os.path.join(ROOT, "scripts/in-cgroup.sh"), limit, "--",
        binary, "run", model, "--prompt", PROMPT, "-n", str(tokens),
        "--temp", str(temp), "--seed", str(seed), "--json", *extra,
    ]
    p = subprocess.run(cmd, capture_output=True, text=True,
                       env={**os.environ, "PEAK": "1", **(env or {})})
    if p.returncode != 0:
        sys.exit(f"run failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr.strip()[-600:]}")
    line = [l for l in p.stderr.splitlines() if l.startswith("{")][-1]
    d = json.loads(line)
    m = re.search(r"cgroup peak: (\d+) MiB", p.stderr)
    d["peak_mib"] = int(m.group(1)) if m else None
    return d


def disk_gbps(binary, model):
    p = subprocess.run([binary, "profile", "--quick", "--file", model],
                       capture_output=True, text=True)
    out = p.stdout + p.stderr
    m = re.search(r"best sequential\s+([0-9.]+) GB/s", out)
    if not m:
        p = subprocess.run([binary, "profile", "--quick"], capture_output=True, text=True)
        m = re.search(r"best sequential\s+([0-9.]+) GB/s", p.stdout + p.stderr)
    return float(m.group(1)) if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("limit")
    ap.add_argument("rounds", type=int)
    ap.add_argument("tokens", type=int)
    ap.add_argument("--temp", type=float, default=0.0)
    ap.add_argument("--hypura", default=os.path.join(ROOT, "target/release/hypura"))
    ap.add_argument("--ab", help="VAR=VALUE: a third run per round with it set")
    ap.add_argument("--no-mmap", action="store_true",
                    help="skip the mmap runs (A/B of Hypura only, with --ab)")
    a = ap.parse_args()
    ab_env = None
    if a.ab:
        var, _, val = a.ab.partition("=")
        ab_env = {var: val}
    # The disk drifts by ±40% within minutes: it is profiled before every
    # round and after the last, and each round's ceiling uses the mean of
    # the profiles on either side of it.
    gbps = [disk_gbps(a.hypura, a.model)]
    print(f"model {a.model}, cgroup {a.limit}, {a.rounds} rounds x {a.tokens} tokens, "
          f"temp {a.temp}; profiled disk {gbps[0]} GB/s", flush=True)
    if a.no_mmap and not ab_env:
        sys.exit("--no-mmap needs --ab")
    kinds = (() if a.no_mmap else ("mmap",)) + ("hypura",) + (("ab",) if ab_env else ())
    rows = {k: [] for k in kinds}
    extra = {"mmap": ["--mode", "resident", "--load-mode", "mmap", "--no-repack"],
             "hypura": [], "ab": []}
    for r in range(a.rounds):
        for kind in kinds:
            d = run(a.hypura, a.model, a.limit, a.tokens, a.temp, r + 1, extra[kind],
                    ab_env if kind == "ab" else None)
            rows[kind].append(d)
            read = d.get("read_bytes_per_token")
            hit = d.get("expert_hit_rate")
            print(f"round {r + 1} {kind:6} gen {d['gen_tps']:.3f} tok/s  mode {d['mode']}  "
                  f"read/token {read / 2**20 if read else 0:.1f} MiB  "
                  f"hits {'' if hit is None else f'{hit:.1%}'}  "
                  f"pinned {d.get('pinned_layers')}  lookahead {d.get('lookahead')}  "
                  f"stall {d.get('stall_ms_per_token') or 0:.0f} ms/token  "
                  f"peak {d['peak_mib']} MiB", flush=True)
        gbps.append(disk_gbps(a.hypura, a.model))
        print(f"profiled disk {gbps[-1]} GB/s", flush=True)
    med = {k: statistics.median(x["gen_tps"] for x in v) for k, v in rows.items()}
    if not a.no_mmap:
        ratios = [h["gen_tps"] / m["gen_tps"] for m, h in zip(rows["mmap"], rows["hypura"])]
        print(f"median gen tok/s: mmap {med['mmap']:.3f}, hypura {med['hypura']:.3f}; "
              f"hypura/mmap per round: {', '.join(f'{x:.2f}x' for x in ratios)}")
    if ab_env:
        ab = [h["gen_tps"] / b["gen_tps"] for h, b in zip(rows["hypura"], rows["ab"])]
        print(f"median gen tok/s with {a.ab}: {med['ab']:.3f}; "
              f"hypura/({a.ab}) per round: {', '.join(f'{x:.2f}x' for x in ab)}")
    reached = []
    for r, h in enumerate(rows["hypura"]):
        read = h.get("read_bytes_per_token")
        if not read or gbps[r] is None or gbps[r + 1] is None:
            continue
        g = (gbps[r] + gbps[r + 1]) / 2
        ceiling = g * 1e9 / read
        reached.append(h["gen_tps"] / ceiling)
        print(f"round {r + 1}: hypura read {read / 2**20:.1f} MiB/token; ceiling at "
              f"{g:.2f} GB/s (profiles before and after): {ceiling:.3f} tok/s; "
              f"reached {reached[-1]:.2f}x of it")
    if reached:
        print(f"reached of the ceiling, median: {statistics.median(reached):.2f}x")


if __name__ == "__main__":
    main()
