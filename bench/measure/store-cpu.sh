#!/usr/bin/env bash
# CPU the stores spend per gateway request: Redis's and Postgres's utime+stime (from /proc)
# across one `nz-bench compare` run of SCENARIO against the gateway alone.
#
# Usage: bench/measure/store-cpu.sh BIN_DIR SCENARIO [LABEL]
# Needs the stores of bench/measure/stores.sh (Redis on 57379, Postgres run as nzpg) and
# target/release/nz-bench.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin_dir=$1
scenario=$2
label=${3:-$(basename "$bin_dir")}
ticks() {
    local t=0 p
    for p in "$@"; do
        [ -r "/proc/$p/stat" ] && t=$((t + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$t"
}
postgres_pids() { ps -eo pid=,user= | awk '$2 == "nzpg" {print $1}'; }
redis=$(pgrep -f "redis-server 127.0.0.1:57379")
json=$(mktemp)
r0=$(ticks "$redis")
p0=$(ticks $(postgres_pids))
target/release/nz-bench compare --bin-dir "$bin_dir" --env-file target/nz-stores/env \
    --scenario "bench/scenarios/$scenario.yaml" --targets gateway --quiet --json-file "$json" \
    > /dev/null 2>&1
r1=$(ticks "$redis")
p1=$(ticks $(postgres_pids))
python3 - "$label" "$json" $((r1 - r0)) $((p1 - p0)) "$(getconf CLK_TCK)" <<'PY'
import json, sys
result = json.load(open(sys.argv[2]))[0]
n = result['stores']['requests']
ms = 1000 / int(sys.argv[5])
print(sys.argv[1], 'requests', n,
      'redis ms/req=%.3f' % (int(sys.argv[3]) * ms / n),
      'postgres ms/req=%.3f' % (int(sys.argv[4]) * ms / n),
      'gateway ms/req=%.3f' % (result['process']['cpu_seconds'] * 1000 / result['summary']['requests']),
      'req/s=%.0f' % result['summary']['rps'])
PY
rm -f "$json"
