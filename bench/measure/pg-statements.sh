#!/usr/bin/env bash
# Postgres statements per request under load: 8 threads x 150 non-streamed /api/chat requests,
# then the delta of pg_stat_database.xact_commit, the audit row count, and the number of batches
# the audit sidecar wrote (each batch = one transaction with one audit INSERT and one
# budget_usage upsert, all in one statement).
# Usage: bench/measure/pg-statements.sh   (builds must exist: cargo build --workspace --bins)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib.sh
nz_ensure_packages >/dev/null 2>&1
T=$(mktemp -d /tmp/nzm.XXXX); chmod 755 $T
nz_start_postgres $T/pg "" off >/dev/null 2>&1
SIM=target/debug/ollama-sim
$SIM --listen 127.0.0.1:0 > $T/sim.out 2>/dev/null &
SIMPID=$!
sleep 0.5
SIMADDR=$(head -1 $T/sim.out | sed 's/listening on //')
export DATABASE_URL=$NZ_TEST_DATABASE_URL OLLAMA_URL=http://$SIMADDR LISTEN_ADDR=127.0.0.1:18081 METRICS_ADDR=127.0.0.1:19464 ARGON2_MEMORY_KIB=1024 ARGON2_ITERATIONS=1 RUST_LOG=warn AUDIT_SPOOL_DIR=$T/spool
GW=target/debug/neuronetz-gateway
$GW serve > $T/gw.log 2>&1 &
GWPID=$!
sleep 2
$GW create-tenant --name acme --allow-all-models >/dev/null
KEY=$($GW create-key --tenant acme --name k --json | python3 -c 'import sys,json;print(json.load(sys.stdin)["key"])')
curl -s -o /dev/null http://127.0.0.1:18081/api/version -H "Authorization: Bearer $KEY"
sleep 1
q() { psql "$DATABASE_URL" -Atc "$1"; }
batches() { curl -s http://127.0.0.1:19464/metrics | awk '/^nz_audit_batch_size_count/ {print $2}'; }
B=$(q "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
NB=$(batches)
T0=$(date +%s.%N)
python3 - "$KEY" <<'PY'
import sys, threading, http.client
key = sys.argv[1]
def worker():
    c = http.client.HTTPConnection("127.0.0.1", 18081)
    for _ in range(150):
        c.request("POST", "/api/chat", body='{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}', headers={"Authorization": "Bearer " + key})
        r = c.getresponse(); r.read()
ts = [threading.Thread(target=worker) for _ in range(8)]
[t.start() for t in ts]; [t.join() for t in ts]
PY
T1=$(date +%s.%N)
# Backends report their transaction counts when idle, at most every second and at the latest
# 10 s later (Postgres 15+): wait for that, or the count comes out short.
sleep 11
A=$(q "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
ROWS=$(q "SELECT count(*) FROM audit_log WHERE path = '/api/chat'")
USAGE=$(q "SELECT requests FROM budget_usage WHERE scope = 'key' AND period = 'total'")
NA=$(batches)
# The same wait with no load: what the background services commit on their own (change-feed
# polls, pool health checks), to tell the load's share apart.
I0=$(q "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
sleep 12.5
I1=$(q "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
echo "idle_xact_commit_in_12.5s=$((I1-I0))"
echo "requests=1200 audit_rows=$ROWS budget_usage_requests=$USAGE xact_commit_delta=$((A-B)) audit_batches=$((NA-NB)) seconds=$(python3 -c "print(round($T1-$T0,2))")"
kill $GWPID $SIMPID; wait $GWPID 2>/dev/null || true
nz_remove_postgres $T/pg >/dev/null 2>&1 || true
rm -rf $T
