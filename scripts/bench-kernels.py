#!/usr/bin/env python3
"""Resident CPU speed, Hypura against upstream llama-bench, side by side.

Both are built natively from the same llama.cpp (Hypura: `cargo build
--release`; llama-bench: scripts/build-upstream.sh). For every model, rounds
alternate the two (llama-bench pp512, and tg128 at depth 512, one repetition; `hypura bench
--mode resident` with a 512-token prompt and 128 generated tokens), so machine
noise lands on both; prints medians and the ratio Hypura / llama-bench as a
Markdown table.

    python3 scripts/bench-kernels.py [--rounds 3] [--threads 2] MODEL...
"""
import argparse, json, os, statistics, subprocess, sys, tempfile

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def llama_bench(exe, model, threads):
    # pp512 from an empty context; tg128 after 512 tokens (-d 512), as Hypura
    # generates after its 512-token prompt.
    def run(args):
        out = subprocess.run([exe, "-m", model, "-t", str(threads), "-r", "1", "-o", "json"] + args,
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)[0]["avg_ts"]
    return run(["-p", "512", "-n", "0"]), run(["-p", "0", "-n", "128", "-d", "512"])


def hypura(exe, model, threads):
    with tempfile.TemporaryDirectory() as d:
        out = subprocess.run(
            [exe, "bench", model, "--mode", "resident", "--lookahead", "0",
             "--prompt-tokens", "512", "--gen-tokens", "128", "--repeat", "1",
             "--warmup", "0", "--threads", str(threads), "--json", "--out", d],
            capture_output=True, text=True, check=True).stdout
    doc = json.loads(out)
    runs = doc["summary"] if "summary" in doc else doc["configs"]
    c = runs[0]
    return c["prompt_tps"]["median"], c["gen_tps"]["median"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hypura", default=os.path.join(root, "target/release/hypura"))
    ap.add_argument("--llama-bench", default=os.path.join(root, "target/upstream/build/bin/llama-bench"))
    ap.add_argument("models", nargs="+")
    a = ap.parse_args()
    rows = []
    for m in a.models:
        got = {"lb": [], "hy": []}
        for r in range(a.rounds):
            order = [("lb", llama_bench, a.llama_bench), ("hy", hypura, a.hypura)]
            if r % 2:
                order.reverse()
            for key, fn, exe in order:
                got[key].append(fn(exe, m, a.threads))
                print(f"{os.path.basename(m)} round {r} {key}: pp {got[key][-1][0]:.1f} tg {got[key][-1][1]:.1f}", file=sys.stderr, flush=True)
        med = lambda k, i: statistics.median(x[i] for x in got[k])
        rows.append((os.path.basename(m), med("lb", 1), med("hy", 1), med("lb", 0), med("hy", 0)))
    print(f"| model | llama-bench tg128 @ d512 | Hypura tg | ratio | llama-bench pp512 | Hypura pp | ratio |")
    print("|---|--:|--:|--:|--:|--:|--:|")
    for n, ltg, htg, lpp, hpp in rows:
        print(f"| {n} | {ltg:.1f} | {htg:.1f} | {htg / ltg:.2f}× | {lpp:.1f} | {hpp:.1f} | {hpp / lpp:.2f}× |")


if __name__ == "__main__":
    main()
