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
# shellcheck source=bench/measure/load-400.sh
. bench/measure/load-400.sh
bin_dir=$(cd "$1" && pwd)
label=${2:-$(basename "$bin_dir")}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
load_400_start "$bin_dir" "${3:-gateway}" "$out"
perf stat -e task-clock,context-switches,raw_syscalls:sys_enter -p "$load_pid" -- sleep 15 \
    2> "$out/perf.txt"
wait "$load_job"
python3 - "$label" "$out/perf.txt" "$LOAD_400_REQUESTS" <<'PY'
import re, sys
text = open(sys.argv[2]).read()
def total(name):
    m = re.search(r'([\d,.]+)\s+(msec\s+)?' + re.escape(name), text)
    return float(m.group(1).replace(',', '')) if m else float('nan')
n = int(sys.argv[3])
print(sys.argv[1], 'ms/req=%.3f cs/req=%.2f syscalls/req=%.2f' % (
    total('task-clock') / n, total('context-switches') / n, total('raw_syscalls:sys_enter') / n))
PY
