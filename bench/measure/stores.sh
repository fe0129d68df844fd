#!/usr/bin/env bash
# Private Postgres and Redis for `nz-bench compare`, under target/nz-stores/ (ignored by git),
# on ports that do not collide with scripts/run (55432/56379):
#
#   bench/measure/stores.sh start [PG_PORT] [REDIS_PORT]   (defaults 57432 / 57379)
#   bench/measure/stores.sh stop
#
# `start` writes target/nz-stores/env (DATABASE_URL, REDIS_URL) for `nz-bench compare --env-file`.
# Postgres runs with fsync=off (benchmark data is throw-away).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
. scripts/lib.sh
DIR="$PWD/target/nz-stores"
case "${1:-}" in
start)
    nz_ensure_packages >/dev/null
    mkdir -p "$DIR"
    chmod 711 target "$DIR"
    nz_start_postgres "$DIR/pg" "${2:-57432}" off
    nz_start_redis "$DIR/redis" "${3:-57379}" no
    printf 'export DATABASE_URL=postgres://postgres@127.0.0.1:%s/postgres\nexport REDIS_URL=redis://127.0.0.1:%s\n' \
        "$NZ_PG_PORT" "$NZ_REDIS_PORT" >"$DIR/env"
    # The same Redis over its Unix socket, for `--gateway-env REDIS_URL=...` (nz-bench itself
    # reads Redis's counters over TCP).
    printf 'export REDIS_UNIX_URL=redis+unix://%s\n' "$DIR/redis/redis.sock" >>"$DIR/env"
    cat "$DIR/env"
    ;;
stop)
    nz_ensure_packages >/dev/null
    [ -e "$DIR/redis" ] && nz_stop_redis "$DIR/redis"
    [ -e "$DIR/pg" ] && nz_stop_postgres "$DIR/pg"
    ;;
*)
    echo "usage: $0 start [PG_PORT] [REDIS_PORT] | stop" >&2
    exit 2
    ;;
esac
