#!/usr/bin/env bash
# Batch figures measured in one run on this machine, printed as ratios:
#   1. `provline bench --batch-dir`: the whole batch (ledger on) against
#      1/(1/C + 1/F), C the crypto and F bare file writes, same threads;
#   2. provline batch against a single-process Python script using
#      `cryptography` doing the same work (benches/python_baseline.py);
#   3. peak memory (/usr/bin/time -v) of a large job against a small one.
# Usage: benches/batch.sh [DEVICES] [SMALL_JOB] [LARGE_JOB]
# Needs python3 with `cryptography` (.venv from .ci/run) and /usr/bin/time.
set -euo pipefail
cd "$(dirname "$0")/.."
devices=${1:-20000}
small=${2:-10000}
large=${3:-1000000}
python=${PROVLINE_PYTHON:-.venv/bin/python}
cargo build --release --quiet
bin=$PWD/target/release/provline
work=$(mktemp -d "${TMPDIR:-/tmp}/provline-batch.XXXXXX")
trap 'rm -rf "$work"' EXIT
job() { { echo serial; seq -f 'SN-%09.0f' 1 "$1"; } > "$2"; }
rate() { "$python" -c 'import json,sys; print(json.load(sys.stdin)["devices_per_sec"])'; }

echo "== batch against the crypto and the file system ($devices devices, 2 threads)"
"$bin" bench --threads 2 --count "$devices" --rounds 3 --batch-dir "$work"

echo "== provline batch against Python cryptography, one process ($devices devices)"
job "$devices" "$work/job.csv"
"$bin" ca init --dir "$work/ca" -q
p=$("$bin" batch "$work/job.csv" --ca "$work/ca" --out "$work/p" --json | rate)
y=$("$python" benches/python_baseline.py "$devices" "$work/y" | rate)
rm -rf "$work/p" "$work/p.ledger.sqlite" "$work/y"
"$python" -c "import sys; p,y=map(float,sys.argv[1:]); print(f'provline {p:.0f}/s, python {y:.0f}/s: {p/y:.2f}x')" "$p" "$y"

echo "== peak memory: $large rows against $small rows"
peak() {
  job "$1" "$work/mem.csv"
  /usr/bin/time -v "$bin" batch "$work/mem.csv" --ca "$work/ca" --out "$work/mem" -q 2> "$work/time.txt" || true
  rm -rf "$work/mem" "$work/mem.ledger.sqlite"*
  awk -F: '/Maximum resident set size/ {gsub(/ /,"",$2); print $2}' "$work/time.txt"
}
s=$(peak "$small"); l=$(peak "$large")
"$python" -c "import sys; s,l=map(int,sys.argv[1:]); print(f'peak RSS {s} KiB at $small rows, {l} KiB at $large rows: {l/s:.2f}x')" "$s" "$l"
