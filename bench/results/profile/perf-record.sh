#!/usr/bin/env bash
set -u
cd "$(dirname "$0")/../../.."
O=${O:-/tmp/nzperf}; mkdir -p $O
target/release/nz-bench compare --env-file target/nz-stores/env --scenario bench/scenarios/chat-stream.yaml --targets passthrough,gateway --quiet --json-file $O/perf-run.json > $O/compare.txt 2> $O/compare.err &
CMP=$!
for i in $(seq 1 100); do grep -q "^started:" $O/compare.err 2>/dev/null && break; sleep 0.2; done
L=$(grep "^started:" $O/compare.err)
PT=$(echo "$L" | sed -E 's/.*nz-passthrough [^ ]+ \(pid ([0-9]+)\).*/\1/')
GW=$(echo "$L" | sed -E 's/.*neuronetz-gateway [^ ]+ \(pid ([0-9]+)\).*/\1/')
echo "pt=$PT gw=$GW"
sleep 10
perf record -F 1999 -p $PT -o $O/pt.data -- sleep 15 2> $O/perf-pt.err
sleep 22
perf record -F 1999 -p $GW -o $O/gw.data -- sleep 15 2> $O/perf-gw.err
wait $CMP
echo done
