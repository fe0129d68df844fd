#!/usr/bin/env bash
# Resident size of a gateway as new keys are verified (Argon2, ARGON2_MEMORY_KIB each), two at a
# time, so verifications land on several blocking-pool threads.
#
# Usage: bench/measure/argon2-rss.sh BIN_DIR [KEYS]
#   BIN_DIR holds ollama-sim and neuronetz-gateway (a release build); KEYS defaults to 24.
# Needs the Postgres of bench/measure/stores.sh (target/nz-stores/env); the gateway runs
# without Redis on a fresh database. Prints VmRSS after start and after every pair of first
# requests, then VmHWM.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
bin_dir=$(cd "$1" && pwd)
keys=${2:-24}
# shellcheck disable=SC1091
. target/nz-stores/env
db="nz_rss_$$"
admin_url=$DATABASE_URL
psql "$admin_url" -qc "CREATE DATABASE $db" > /dev/null
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2> /dev/null || true; done
    sleep 0.5
    psql "$admin_url" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" > /dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
sim_port=$(port)
gw_port=$(port)
"$bin_dir/ollama-sim" --listen "127.0.0.1:$sim_port" > "$work/sim.log" 2>&1 &
pids+=($!)
export DATABASE_URL="${DATABASE_URL%/*}/$db" OLLAMA_URL="http://127.0.0.1:$sim_port"
export LISTEN_ADDR="127.0.0.1:$gw_port" METRICS_ADDR="127.0.0.1:$(port)"
unset REDIS_URL
printf 'version: 1\nthreads: 2\npid_file: %s/gw.pid\nupgrade_sock: %s/gw.sock\n' "$work" "$work" > "$work/conf.yaml"
"$bin_dir/neuronetz-gateway" serve -c "$work/conf.yaml" > "$work/gw.log" 2>&1 &
gw=$!
pids+=("$gw")
for _ in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$gw_port/healthz" > /dev/null 2>&1 && break
    sleep 0.1
done
cli() { "$bin_dir/neuronetz-gateway" "$@"; }
cli create-tenant --name rss --allow-all-models > /dev/null
mapfile -t all < <(for i in $(seq 1 "$keys"); do
    cli create-key --tenant rss --name "k$i" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["key"])'
done)
rss() { awk -v l="$1" '/^VmRSS/ {print l, $2, "kB"}' "/proc/$gw/status"; }
chat() {
    curl -s -o /dev/null -w '%{http_code}\n' "http://127.0.0.1:$gw_port/api/chat" \
        -H "Authorization: Bearer $1" -d '{"model":"llama3.2","messages":[{"role":"user","content":"hi"}]}'
}
rss "start"
for ((i = 0; i < keys; i += 2)); do
    chat "${all[$i]}" > "$work/a" &
    first=$!
    chat "${all[$((i + 1))]}" > "$work/b"
    wait "$first"
    rss "after $((i + 2)) keys (status $(cat "$work/a") $(cat "$work/b"))"
done
awk '/^VmHWM/ {print "peak", $2, "kB"}' "/proc/$gw/status"
