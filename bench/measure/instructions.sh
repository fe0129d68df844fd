#!/usr/bin/env bash
# User-space instructions and allocations per request of one proxy, counted by callgrind: a
# figure that, unlike CPU time on a shared VM, does not move between runs, so a change of a few
# per cent shows. Kernel work (system calls, the network stack) is not in it.
#
# Usage: bench/measure/instructions.sh BIN_DIR [gateway|passthrough] [LABEL] [KEEP_DIR]
#   BIN_DIR   holds ollama-sim, nz-passthrough and neuronetz-gateway (a release build)
#   KEEP_DIR  keeps the two runs' callgrind profiles there (LABEL-10s.out, LABEL-30s.out), for
#             `callgrind_annotate`
# Needs valgrind, the stores of bench/measure/stores.sh and target/release/nz-bench.
# COMPARE_ARGS (optional) is appended to the `nz-bench compare` command line, e.g.
#   COMPARE_ARGS="--gateway-env REDIS_URL=" for the gateway's in-process limits.
# Runs the chat-stream scenario at 20 req/s (the proxy runs ~50x slower under callgrind) twice,
# 10 s and 30 s after the same warm-up; the difference between the two runs is 400 requests'
# worth, so start-up and warm-up cancel out. Time-driven background work (timers, the change
# feed, discovery) is included, at its share for 20 req/s. Prints one line:
#   LABEL instructions/req=… mallocs/req=… reallocs/req=…
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin_dir=$(cd "$1" && pwd)
target=${2:-gateway}
label=${3:-$(basename "$bin_dir")-$target}
keep=${4:-}
case "$target" in
    gateway) exe=neuronetz-gateway ;;
    passthrough) exe=nz-passthrough ;;
    *) echo "target must be gateway or passthrough" >&2; exit 2 ;;
esac
command -v valgrind > /dev/null || { echo "valgrind is not installed" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for seconds in 10 30; do
    wrap="$work/bin-$seconds"
    mkdir -p "$wrap" "$work/out-$seconds"
    for b in ollama-sim nz-passthrough neuronetz-gateway; do ln -s "$bin_dir/$b" "$wrap/$b"; done
    rm "$wrap/$exe"
    # Every run of the binary (the gateway's admin commands too) writes a file; the serving
    # process's is the largest.
    printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/%%p.out %s "$@"\n' \
        "$work/out-$seconds" "$bin_dir/$exe" > "$wrap/$exe"
    chmod +x "$wrap/$exe"
    target/release/nz-bench compare --bin-dir "$wrap" --env-file target/nz-stores/env \
        --scenario bench/scenarios/chat-stream.yaml --targets "$target" --rate 20 \
        --warmup 5s --duration "${seconds}s" --quiet ${COMPARE_ARGS:-} > "$work/run-$seconds.log" 2>&1
done
python3 - "$label" "$work" "$keep" <<'PY'
import glob, os, re, shutil, subprocess, sys
label, work, keep = sys.argv[1], sys.argv[2], sys.argv[3]

def profile(seconds):
    files = glob.glob(f'{work}/out-{seconds}/*.out')
    return max(files, key=os.path.getsize)

def totals(path):
    for line in open(path, errors='replace'):
        if line.startswith('totals:'):
            return int(line.split()[1])
    raise SystemExit(f'no totals in {path}')

def calls(path, function):
    """Calls of a libc function, summed over its callers (callgrind_annotate's caller tree)."""
    out = subprocess.run(['callgrind_annotate', '--auto=no', '--tree=caller', '--threshold=100',
                          path], capture_output=True, text=True, check=True).stdout.split('\n')
    total = 0
    for i, line in enumerate(out):
        if re.search(r'\*\s+\S+:' + function + r'( \[|$)', line):
            j = i - 1
            while j >= 0 and out[j].strip():
                m = re.search(r'<.*\((\d[\d,]*)x\)', out[j])
                if m:
                    total += int(m.group(1).replace(',', ''))
                j -= 1
    return total

short, long = profile(10), profile(30)
if keep:
    os.makedirs(keep, exist_ok=True)
    shutil.copy(short, f'{keep}/{label}-10s.out')
    shutil.copy(long, f'{keep}/{label}-30s.out')
n = 20 * (30 - 10)
print(label, 'instructions/req=%.0f mallocs/req=%.1f reallocs/req=%.1f' % (
    (totals(long) - totals(short)) / n,
    (calls(long, 'malloc') - calls(short, 'malloc')) / n,
    (calls(long, 'realloc') - calls(short, 'realloc')) / n))
PY
