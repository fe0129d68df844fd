#!/usr/bin/env bash
# One proxy's CPU per thread (user and system time, from /proc) while `nz-bench compare` runs
# the chat-stream scenario (400 req/s) against it alone: shows whether a change moved the
# worker threads' CPU or a background thread's (audit writer, change feed, timers).
#
# Usage: bench/measure/thread-cpu.sh BIN_DIR [LABEL] [gateway|passthrough]
#   BIN_DIR  holds ollama-sim, nz-passthrough and neuronetz-gateway (a release build)
# Needs the stores of bench/measure/stores.sh and target/release/nz-bench. Prints one line per
# thread that used CPU, then the total per request (15 s measured inside a 30 s run: 6 000
# requests; a tick is 10 ms).
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
trap 'rm -rf "$out"' EXIT
target/release/nz-bench compare --bin-dir "$bin_dir" --env-file target/nz-stores/env \
    --scenario bench/scenarios/chat-stream.yaml --targets "$target" --duration 30s --quiet \
    > "$out/run.log" 2>&1 &
bench=$!
sleep 10
pid=$(pgrep -f "$pattern" | head -1)
snapshot() {
    local t
    for t in /proc/"$pid"/task/*; do
        printf '%s %s %s\n' "$(basename "$t")" "$(tr ' ' _ < "$t/comm")" \
            "$(awk '{print $14, $15}' "$t/stat")"
    done | sort
}
snapshot > "$out/a"
sleep 15
snapshot > "$out/b"
wait "$bench"
join "$out/a" "$out/b" | awk -v label="$label" '
    { u = $6 - $3; s = $7 - $4; if (u + s > 0) printf "%s %-20s user %4d sys %4d ticks\n", label, $2, u, s; tu += u; ts += s }
    END { printf "%s total ms/req=%.3f (user %.3f, sys %.3f)\n", label, (tu + ts) * 10 / 6000, tu * 10 / 6000, ts * 10 / 6000 }'
