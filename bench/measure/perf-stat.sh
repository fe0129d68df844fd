#!/usr/bin/env bash
# Counts one proxy's CPU time, context switches and system calls per request with `perf stat`
# while `nz-bench compare` runs the chat-stream scenario (400 req/s) against it alone.
#
# Usage: bench/measure/perf-stat.sh BIN_DIR [LABEL] [gateway|passthrough]
#   BIN_DIR  holds ollama-sim, nz-passthrough and neuronetz-gateway (a release build)
# Needs perf, the stores of bench/measure/stores.sh and target/release/nz-bench. Prints one line:
#   LABEL ms/req=… cs/req=… syscalls/req=…   (15 s measured inside a 30 s run: 6 000 requests)
# perf's system-call tracepoint slows the process a little: compare CPU only between runs of
# this script, not with `nz-bench compare` figures.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin_dir=$(cd "$1" && pwd)
label=${2:-$(basename "$bin_dir")}
target=${3:-gateway}
case "$target" in
    gateway) pattern="$bin_dir/neuronetz-gateway serve" ;;
    passthrough) pattern="$bin_dir/nz-passthrough" ;;
    *) echo "target must be gateway or passthrough" >&2; exit 2 ;;
esac
out=$(mktemp -d)
target/release/nz-bench compare --bin-dir "$bin_dir" --env-file target/nz-stores/env \
    --scenario bench/scenarios/chat-stream.yaml --targets "$target" --duration 30s --quiet \
    > "$out/run.log" 2>&1 &
bench=$!
sleep 10
pid=$(pgrep -f "$pattern" | head -1)
perf stat -e task-clock,context-switches,raw_syscalls:sys_enter -p "$pid" -- sleep 15 \
    2> "$out/perf.txt"
wait "$bench"
python3 - "$label" "$out/perf.txt" <<'PY'
import re, sys
text = open(sys.argv[2]).read()
def total(name):
    m = re.search(r'([\d,.]+)\s+(msec\s+)?' + re.escape(name), text)
    return float(m.group(1).replace(',', '')) if m else float('nan')
n = 400 * 15
print(sys.argv[1], 'ms/req=%.3f cs/req=%.2f syscalls/req=%.2f' % (
    total('task-clock') / n, total('context-switches') / n, total('raw_syscalls:sys_enter') / n))
PY
rm -rf "$out"
