#!/usr/bin/env bash
# Redis commands per request: 200 non-streamed /api/chat requests from one key with RPM, TPM,
# concurrency limits and daily/monthly/total budgets at key and tenant level, then INFO
# commandstats (after CONFIG RESETSTAT). Usage: bench/measure/redis-commands.sh   (builds must exist: cargo build --workspace --bins)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib.sh
nz_ensure_packages >/dev/null 2>&1
T=$(mktemp -d /tmp/nzm.XXXX); chmod 755 $T
nz_start_postgres $T/pg "" off >/dev/null 2>&1
RP=$(python3 -c "import socket;s=socket.socket();s.bind((\"127.0.0.1\",0));print(s.getsockname()[1])")
redis-server --port $RP --save "" --appendonly no --daemonize yes --pidfile $T/redis.pid >/dev/null
sleep 0.3
SIM=target/debug/ollama-sim
$SIM --listen 127.0.0.1:0 --require-token tok > $T/sim.out 2>/dev/null &
SIMPID=$!
sleep 0.5
SIMADDR=$(head -1 $T/sim.out | sed 's/listening on //')
export DATABASE_URL=$NZ_TEST_DATABASE_URL REDIS_URL=redis://127.0.0.1:$RP OLLAMA_URL=http://$SIMADDR OLLAMA_AUTH_TOKEN=tok KEY_CACHE_SECRET=measure-secret-0123456789 LISTEN_ADDR=127.0.0.1:18080 ARGON2_MEMORY_KIB=1024 ARGON2_ITERATIONS=1 RUST_LOG=warn
GW=target/debug/neuronetz-gateway
$GW serve > $T/gw.log 2>&1 &
GWPID=$!
sleep 2
$GW create-tenant --name acme --allow-all-models >/dev/null
KEY=$($GW create-key --tenant acme --name k --json | python3 -c 'import sys,json;print(json.load(sys.stdin)["key"])')
P=$(echo $KEY | cut -c1-12)
$GW set-limits --prefix $P --rpm 100000 --tpm 100000000 --max-concurrent 1000 >/dev/null
$GW set-limits --tenant acme --rpm 100000 --tpm 100000000 --max-concurrent 1000 >/dev/null
$GW set-budget --prefix $P --daily 100000000 --monthly 1000000000 --total 10000000000 >/dev/null
$GW set-budget --tenant acme --daily 100000000 --monthly 1000000000 --total 10000000000 >/dev/null
sleep 1
curl -s -o /dev/null http://127.0.0.1:18080/api/chat -H "Authorization: Bearer $KEY" -d '{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}'
sleep 0.5
redis-cli -p $RP CONFIG RESETSTAT >/dev/null
N=200
for i in $(seq 1 $N); do
  curl -s -o /dev/null http://127.0.0.1:18080/api/chat -H "Authorization: Bearer $KEY" -d '{"model":"llama3.2","stream":false,"messages":[{"role":"user","content":"hi"}]}'
done
echo "requests: $N"
redis-cli -p $RP INFO commandstats | grep cmdstat
kill $GWPID $SIMPID; wait $GWPID 2>/dev/null || true
redis-cli -p $RP shutdown nosave >/dev/null 2>&1 || true
nz_remove_postgres $T/pg >/dev/null 2>&1 || true
rm -rf $T
