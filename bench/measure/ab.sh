#!/usr/bin/env bash
# A/B of two builds with `nz-bench compare`, interleaved so that drift on a shared machine
# (other load, thermal, page cache) falls on both sides alike.
#
# Usage: bench/measure/ab.sh OUTDIR "DIR_A DIR_B DIR_A DIR_B ..." SCENARIO... [-- COMPARE_FLAGS...]
#   DIR_*     directories holding ollama-sim, nz-passthrough and neuronetz-gateway (copy each
#             build's target/release binaries into one)
#   SCENARIO  names under bench/scenarios (without .yaml)
#   after --  extra flags for `nz-bench compare` (default: --targets passthrough,gateway)
# Needs the stores of bench/measure/stores.sh (target/nz-stores/env) and target/release/nz-bench.
# Writes OUTDIR/<n>-<dir name>.{json,txt,err}; summarise with `nz-bench report OUTDIR/*.json`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
out=$1
dirs=$2
shift 2
scenarios=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do
    scenarios+=(--scenario "bench/scenarios/$1.yaml")
    shift
done
[ "${1:-}" = "--" ] && shift
flags=("$@")
[ ${#flags[@]} -eq 0 ] && flags=(--targets passthrough,gateway)
mkdir -p "$out"
n=0
for dir in $dirs; do
    n=$((n + 1))
    name="$n-$(basename "$dir")"
    echo "==> $name"
    target/release/nz-bench compare --bin-dir "$dir" --env-file target/nz-stores/env \
        "${scenarios[@]}" "${flags[@]}" --quiet --json-file "$out/$name.json" \
        > "$out/$name.txt" 2> "$out/$name.err"
done
