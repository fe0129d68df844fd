#!/usr/bin/env bash
set -u
cd "$(dirname "$0")/../../.."
O=${O:-/tmp/nzperf}; mkdir -p $O
target/release/nz-bench compare --env-file target/nz-stores/env --scenario bench/scenarios/chat-stream.yaml --targets passthrough,gateway --quiet --json-file $O/stat-run.json > $O/stat-compare.txt 2> $O/stat-compare.err &
CMP=$!
for i in $(seq 1 100); do grep -q "^started:" $O/stat-compare.err 2>/dev/null && break; sleep 0.2; done
L=$(grep "^started:" $O/stat-compare.err)
PT=$(echo "$L" | sed -E 's/.*nz-passthrough [^ ]+ \(pid ([0-9]+)\).*/\1/')
GW=$(echo "$L" | sed -E 's/.*neuronetz-gateway [^ ]+ \(pid ([0-9]+)\).*/\1/')
echo "pt=$PT gw=$GW"
sleep 10
perf stat -e task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter -p $PT -o $O/stat-pt.txt -- sleep 15
sleep 22
perf stat -e task-clock,context-switches,cpu-migrations,raw_syscalls:sys_enter -p $GW --per-thread -o $O/stat-gw-threads.txt -- sleep 15
wait $CMP
echo done
