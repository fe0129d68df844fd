#!/usr/bin/env bash
# One proxy's CPU per thread (user and system time, from /proc) while `nz-bench compare` runs
# the chat-stream scenario (400 req/s) against it alone: shows whether a change moved the
# worker threads' CPU or a background thread's (audit writer, change feed, timers).
#
# Usage: bench/measure/thread-cpu.sh BIN_DIR [LABEL] [gateway|passthrough]
#   BIN_DIR  holds ollama-sim, nz-passthrough and neuronetz-gateway (a release build)
# Needs the stores of bench/measure/stores.sh and target/release/nz-bench. Prints one line per
# thread that used CPU (user and system ticks of 10 ms from /proc/<pid>/task/<tid>/stat, and
# the time on CPU in ms from schedstat, which is exact), then the totals per request (15 s
# measured inside a 30 s run: 6 000 requests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
# shellcheck source=bench/measure/load-400.sh
. bench/measure/load-400.sh
bin_dir=$(cd "$1" && pwd)
label=${2:-$(basename "$bin_dir")}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
load_400_start "$bin_dir" "${3:-gateway}" "$out"
pid=$load_pid
snapshot() {
    local t
    for t in /proc/"$pid"/task/*; do
        printf '%s %s %s\n' "$(basename "$t")" "$(tr ' ' _ < "$t/comm")" \
            "$(awk '{print $14, $15}' "$t/stat") $(awk '{print $1}' "$t/schedstat")"
    done | sort
}
snapshot > "$out/a"
sleep 15
snapshot > "$out/b"
wait "$load_job"
join "$out/a" "$out/b" | awk -v label="$label" -v n="$LOAD_400_REQUESTS" '
    { u = $7 - $3; s = $8 - $4; ns = $9 - $5
      if (ns > 0) printf "%s %-20s user %4d sys %4d ticks  %8.1f ms on CPU\n", label, $2, u, s, ns / 1e6
      tu += u; ts += s; tns += ns }
    END { printf "%s total ms/req=%.4f on CPU (ticks: user %.3f, sys %.3f)\n", label, tns / 1e6 / n, tu * 10 / n, ts * 10 / n }'
