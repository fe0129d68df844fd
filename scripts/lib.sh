# shellcheck shell=bash
# Helper functions for scripts/test and scripts/run. Source it; do not execute it.
#
#   . "$(dirname "$0")/lib.sh"
#
# Every function works under `set -euo pipefail`. Functions that discover or start
# something export what they found:
#
#   nz_ensure_packages          -> NZ_PG_BIN, NZ_REDIS_SERVER, NZ_PG_RUN_AS
#   nz_ensure_venv DIR          -> NZ_TEST_PYTHON
#   nz_start_postgres DATADIR   -> NZ_TEST_DATABASE_URL, NZ_PG_PORT
#   nz_start_redis DIR          -> NZ_TEST_REDIS_URL, NZ_REDIS_PORT
#
# Postgres and Redis started here are always private instances bound to 127.0.0.1 on
# a port of their own; the system services (5432/6379) are never touched.

# Repository root (the parent of scripts/).
NZ_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export NZ_ROOT

# Unprivileged account that runs Postgres when we are root (postgres refuses to run as root).
NZ_PG_SYSTEM_USER="${NZ_PG_SYSTEM_USER:-nzpg}"

nz_log() { printf '%s\n' "$*" >&2; }
nz_die() { printf 'error: %s\n' "$*" >&2; return 1; }

# --------------------------------------------------------------------------------------
# Packages
# --------------------------------------------------------------------------------------

_NZ_APT_UPDATED=""

# _nz_apt_install PKG... : install Debian packages (apt-get update at most once per shell).
_nz_apt_install() {
    local -a sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        if command -v sudo >/dev/null 2>&1; then
            sudo=(sudo)
        else
            nz_die "need to install $* but not root and no sudo; install them and retry"
            return 1
        fi
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        nz_die "need to install $* but apt-get is not available; install them and retry"
        return 1
    fi
    if [ -z "$_NZ_APT_UPDATED" ]; then
        nz_log "==> apt-get update"
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q
        _NZ_APT_UPDATED=1
    fi
    nz_log "==> apt-get install $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@"
}

# _nz_find_pg_bin : print the directory holding initdb, pg_ctl and postgres, or fail.
_nz_find_pg_bin() {
    local d cand
    local -a cands=()
    if [ -n "${NZ_PG_BIN:-}" ]; then
        cands+=("$NZ_PG_BIN")
    fi
    if cand="$(command -v initdb 2>/dev/null)"; then
        # Resolve symlinks (/usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb):
        # initdb looks for `postgres` next to its real location.
        cands+=("$(dirname "$(readlink -f "$cand")")")
    fi
    # Debian layout, newest major version first.
    while IFS= read -r d; do
        [ -n "$d" ] && cands+=("$d")
    done < <(printf '%s\n' /usr/lib/postgresql/*/bin | grep -v '\*' | sort -t/ -k5 -V -r)
    for d in "${cands[@]}"; do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
            printf '%s\n' "$d"
            return 0
        fi
    done
    return 1
}

_nz_python_has_venv() {
    command -v python3 >/dev/null 2>&1 &&
        python3 -m venv --help >/dev/null 2>&1 &&
        # Debian ships `venv` in libpython but `ensurepip` only in python3-venv;
        # without it `python3 -m venv` fails halfway.
        python3 -c 'import ensurepip' >/dev/null 2>&1
}

# nz_ensure_packages : cmake, a C compiler, redis-server, Postgres server binaries,
# python3 with venv. Exports NZ_PG_BIN, NZ_REDIS_SERVER and NZ_PG_RUN_AS (the user
# Postgres must run as when we are root; empty otherwise).
nz_ensure_packages() {
    local -a missing=()
    command -v cmake >/dev/null 2>&1 || missing+=(cmake)
    { command -v cc >/dev/null 2>&1 && command -v make >/dev/null 2>&1; } || missing+=(build-essential)
    command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
    command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
    _nz_find_pg_bin >/dev/null || missing+=(postgresql)
    _nz_python_has_venv || missing+=(python3 python3-venv)
    if [ "${#missing[@]}" -gt 0 ]; then
        _nz_apt_install "${missing[@]}"
    fi

    NZ_PG_BIN="$(_nz_find_pg_bin)" || { nz_die "Postgres server binaries (initdb, pg_ctl, postgres) not found"; return 1; }
    NZ_REDIS_SERVER="$(command -v redis-server)" || { nz_die "redis-server not found"; return 1; }
    _nz_python_has_venv || { nz_die "python3 with venv support not found"; return 1; }
    if [ "$(id -u)" -eq 0 ]; then
        NZ_PG_RUN_AS="$NZ_PG_SYSTEM_USER"
    else
        NZ_PG_RUN_AS=""
    fi
    export NZ_PG_BIN NZ_REDIS_SERVER NZ_PG_RUN_AS
}

# nz_ensure_rust_components : rustfmt and clippy (only matters on a bare rustup install).
nz_ensure_rust_components() {
    local -a comps=()
    cargo fmt --version >/dev/null 2>&1 || comps+=(rustfmt)
    cargo clippy --version >/dev/null 2>&1 || comps+=(clippy)
    if [ "${#comps[@]}" -gt 0 ]; then
        if command -v rustup >/dev/null 2>&1; then
            rustup component add "${comps[@]}"
        else
            nz_die "cargo ${comps[*]} missing and rustup not found"
            return 1
        fi
    fi
}

# nz_ensure_cargo_deny : cargo-deny from crates.io (built from source, no prebuilt download).
nz_ensure_cargo_deny() {
    if cargo deny --version >/dev/null 2>&1; then
        return 0
    fi
    nz_log "==> cargo install --locked cargo-deny"
    cargo install --locked cargo-deny
    cargo deny --version >/dev/null
}

# nz_ensure_venv DIR : python venv in DIR with tests/python/requirements.txt installed.
# Reinstalls only when the requirements (or the interpreter) changed. Exports NZ_TEST_PYTHON.
nz_ensure_venv() {
    local dir="${1:?usage: nz_ensure_venv DIR}"
    local req="$NZ_ROOT/tests/python/requirements.txt"
    local stamp="$dir/.nz-requirements.sha256"
    local want
    [ -f "$req" ] || { nz_die "$req not found"; return 1; }
    want="$( { sha256sum <"$req"; python3 -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
    if [ ! -x "$dir/bin/python" ] || ! "$dir/bin/python" -c 'import sys' >/dev/null 2>&1; then
        rm -rf "$dir"
        nz_log "==> python3 -m venv $dir"
        mkdir -p "$(dirname "$dir")"
        python3 -m venv "$dir"
    fi
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        nz_log "==> pip install -r tests/python/requirements.txt"
        "$dir/bin/python" -m pip install --disable-pip-version-check -q -r "$req"
        printf '%s\n' "$want" >"$stamp"
    fi
    NZ_TEST_PYTHON="$(cd "$dir" && pwd)/bin/python"
    export NZ_TEST_PYTHON
}

# --------------------------------------------------------------------------------------
# Ports
# --------------------------------------------------------------------------------------

# nz_port_in_use PORT : true when something accepts connections on 127.0.0.1:PORT.
nz_port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# nz_free_port : print a free TCP port on 127.0.0.1.
nz_free_port() {
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return
    fi
    local p i
    for i in $(seq 1 200); do
        p=$((20000 + RANDOM % 40000))
        if ! nz_port_in_use "$p"; then
            printf '%s\n' "$p"
            return 0
        fi
        : "$i"
    done
    nz_die "no free port found"
}

# nz_wait_port PORT [SECONDS] : wait until 127.0.0.1:PORT accepts connections.
nz_wait_port() {
    local port="$1" secs="${2:-30}" i
    for i in $(seq 1 $((secs * 10))); do
        nz_port_in_use "$port" && return 0
        sleep 0.1
        : "$i"
    done
    return 1
}

# --------------------------------------------------------------------------------------
# Postgres
# --------------------------------------------------------------------------------------

# _nz_pg_as CMD... : run CMD as the Postgres user (nzpg when root, else ourselves), from /.
_nz_pg_as() {
    if [ -n "${NZ_PG_RUN_AS:-}" ]; then
        (cd / && runuser -u "$NZ_PG_RUN_AS" -- "$@")
    else
        (cd / && "$@")
    fi
}

_nz_pg_ensure_user() {
    [ -n "${NZ_PG_RUN_AS:-}" ] || return 0
    if ! id -u "$NZ_PG_RUN_AS" >/dev/null 2>&1; then
        nz_log "==> useradd -r $NZ_PG_RUN_AS (Postgres refuses to run as root)"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin "$NZ_PG_RUN_AS"
    fi
}

# _nz_pg_realdir DATADIR : print the directory that really holds the cluster.
# When root and the unprivileged user cannot reach DATADIR (e.g. a checkout under /root,
# mode 0700), the cluster lives under /var/tmp/nzpg-<hash> and DATADIR is a symlink to it.
_nz_pg_realdir() {
    local datadir="$1" parent abs hash real
    if [ -L "$datadir" ]; then
        readlink -f "$datadir"
        return 0
    fi
    mkdir -p "$datadir"
    abs="$(cd "$datadir" && pwd)"
    if [ -z "${NZ_PG_RUN_AS:-}" ]; then
        printf '%s\n' "$abs"
        return 0
    fi
    parent="$(dirname "$abs")"
    if runuser -u "$NZ_PG_RUN_AS" -- test -x "$parent" 2>/dev/null; then
        printf '%s\n' "$abs"
        return 0
    fi
    # Unreachable for the postgres user: relocate (only possible while still empty).
    if [ -n "$(ls -A "$abs")" ]; then
        nz_die "$abs is not reachable by user $NZ_PG_RUN_AS and not empty"
        return 1
    fi
    hash="$(printf '%s' "$abs" | sha256sum | cut -c1-12)"
    real="/var/tmp/nzpg-$hash"
    mkdir -p "$real"
    rmdir "$abs"
    ln -s "$real" "$abs"
    nz_log "note: $abs is not reachable by user $NZ_PG_RUN_AS; cluster lives in $real"
    printf '%s\n' "$real"
}

# _nz_pg_running REALDIR : true when a postmaster serves REALDIR.
_nz_pg_running() {
    [ -f "$1/postmaster.pid" ] && _nz_pg_as "$NZ_PG_BIN/pg_ctl" -D "$1" status >/dev/null 2>&1
}

# nz_start_postgres DATADIR [PORT] [FSYNC] : private Postgres on 127.0.0.1.
#   PORT  : empty or absent = a free port (an already running instance keeps its port)
#   FSYNC : on (default) | off  (off only for throw-away test instances)
# Runs initdb when DATADIR is empty (superuser `postgres`, trust auth, UTF8). Exports
# NZ_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:PORT/postgres and NZ_PG_PORT.
nz_start_postgres() {
    local datadir="${1:?usage: nz_start_postgres DATADIR [PORT] [on|off]}"
    local port="${2:-}" fsync="${3:-on}" real sockdir
    local -a opts
    case "$fsync" in on | off) ;; *) nz_die "nz_start_postgres: FSYNC must be on or off"; return 1 ;; esac
    [ -n "${NZ_PG_BIN:-}" ] || NZ_PG_BIN="$(_nz_find_pg_bin)" || { nz_die "Postgres binaries not found (run nz_ensure_packages)"; return 1; }
    if [ -z "${NZ_PG_RUN_AS+x}" ]; then
        if [ "$(id -u)" -eq 0 ]; then NZ_PG_RUN_AS="$NZ_PG_SYSTEM_USER"; else NZ_PG_RUN_AS=""; fi
    fi
    export NZ_PG_BIN NZ_PG_RUN_AS
    _nz_pg_ensure_user
    real="$(_nz_pg_realdir "$datadir")"

    if _nz_pg_running "$real"; then
        # Reuse: postmaster.pid line 4 is the port.
        port="$(sed -n 4p "$real/postmaster.pid")"
        nz_log "==> postgres already running in $datadir on 127.0.0.1:$port"
    else
        if [ -n "${NZ_PG_RUN_AS:-}" ]; then
            chown -R "$NZ_PG_RUN_AS:" "$real"
        fi
        chmod 700 "$real"
        if [ ! -f "$real/PG_VERSION" ]; then
            nz_log "==> initdb $datadir"
            _nz_pg_as "$NZ_PG_BIN/initdb" -D "$real" -U postgres --auth=trust -E UTF8 \
                --no-locale --no-sync >"$real.initdb.log" 2>&1 || {
                cat "$real.initdb.log" >&2
                rm -f "$real.initdb.log"
                nz_die "initdb failed"
                return 1
            }
            rm -f "$real.initdb.log"
        fi
        [ -n "$port" ] || port="$(nz_free_port)"
        if nz_port_in_use "$port"; then
            nz_die "port $port is already in use"
            return 1
        fi
        # Unix socket in the data dir when the path fits (sun_path is 108 bytes), else none.
        sockdir="$real"
        if [ "$((${#real} + 20))" -gt 100 ]; then sockdir=""; fi
        opts=(-p "$port" -k "'$sockdir'" -c listen_addresses=127.0.0.1 -c "fsync=$fsync"
            -c max_connections=200)
        if [ "$fsync" = off ]; then
            opts+=(-c synchronous_commit=off -c full_page_writes=off)
        fi
        nz_log "==> starting postgres ($datadir) on 127.0.0.1:$port, fsync=$fsync"
        if ! _nz_pg_as "$NZ_PG_BIN/pg_ctl" -D "$real" -l "$real/log" -w -t 60 \
            -o "${opts[*]}" start >/dev/null; then
            tail -n 30 "$real/log" >&2 || true
            nz_die "postgres failed to start (log: $real/log)"
            return 1
        fi
    fi
    NZ_PG_PORT="$port"
    NZ_TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$port/postgres"
    export NZ_PG_PORT NZ_TEST_DATABASE_URL
}

# nz_stop_postgres DATADIR : stop the instance (fast shutdown; immediate as fallback).
nz_stop_postgres() {
    local datadir="${1:?usage: nz_stop_postgres DATADIR}" real
    [ -e "$datadir" ] || return 0
    real="$(readlink -f "$datadir")"
    [ -f "$real/postmaster.pid" ] || return 0
    [ -n "${NZ_PG_BIN:-}" ] || NZ_PG_BIN="$(_nz_find_pg_bin)" || return 1
    if [ -z "${NZ_PG_RUN_AS+x}" ]; then
        if [ "$(id -u)" -eq 0 ]; then NZ_PG_RUN_AS="$NZ_PG_SYSTEM_USER"; else NZ_PG_RUN_AS=""; fi
    fi
    _nz_pg_as "$NZ_PG_BIN/pg_ctl" -D "$real" -m fast -w -t 30 stop >/dev/null 2>&1 ||
        _nz_pg_as "$NZ_PG_BIN/pg_ctl" -D "$real" -m immediate -w -t 30 stop >/dev/null 2>&1 ||
        true
    if [ -f "$real/postmaster.pid" ] && _nz_pg_running "$real"; then
        nz_die "postgres in $datadir did not stop"
        return 1
    fi
}

# nz_remove_postgres DATADIR : stop and delete the cluster (also a relocated one).
nz_remove_postgres() {
    local datadir="${1:?usage: nz_remove_postgres DATADIR}" real
    [ -e "$datadir" ] || [ -L "$datadir" ] || return 0
    nz_stop_postgres "$datadir" || true
    real="$(readlink -f "$datadir")"
    if [ -L "$datadir" ]; then rm -f "$datadir"; fi
    rm -rf "$real"
}

# --------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------

# _nz_redis_ping PORT : true when Redis on 127.0.0.1:PORT answers PING.
_nz_redis_ping() {
    local port="$1" line=""
    if command -v redis-cli >/dev/null 2>&1; then
        [ "$(redis-cli -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]
        return
    fi
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
        printf 'PING\r\n' >&3
        IFS= read -r -t 2 line <&3 || exit 1
        [ "${line%$'\r'}" = "+PONG" ]
    ) 2>/dev/null
}

_nz_redis_pid() {
    local pidfile="$1/redis.pid" pid
    [ -f "$pidfile" ] || return 1
    pid="$(cat "$pidfile")"
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    printf '%s\n' "$pid"
}

# nz_start_redis DIR [PORT] [PERSIST] : private Redis on 127.0.0.1.
#   PORT    : empty or absent = a free port (an already running instance keeps its port)
#   PERSIST : no (default: no RDB, no AOF) | yes (RDB snapshots in DIR, for dev use)
# Exports NZ_TEST_REDIS_URL=redis://127.0.0.1:PORT and NZ_REDIS_PORT. It also listens on the
# Unix socket DIR/redis.sock (mode 700), for REDIS_URL=redis+unix://DIR/redis.sock.
nz_start_redis() {
    local dir="${1:?usage: nz_start_redis DIR [PORT] [yes|no]}" port="${2:-}" persist="${3:-no}" i
    local -a save
    [ -n "${NZ_REDIS_SERVER:-}" ] || NZ_REDIS_SERVER="$(command -v redis-server)" || { nz_die "redis-server not found"; return 1; }
    export NZ_REDIS_SERVER
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    if _nz_redis_pid "$dir" >/dev/null && [ -f "$dir/redis.port" ] && _nz_redis_ping "$(cat "$dir/redis.port")"; then
        port="$(cat "$dir/redis.port")"
        nz_log "==> redis already running in $dir on 127.0.0.1:$port"
    else
        [ -n "$port" ] || port="$(nz_free_port)"
        if nz_port_in_use "$port"; then
            nz_die "port $port is already in use"
            return 1
        fi
        case "$persist" in
            yes) save=(--save '60 1' --appendonly no --dbfilename dump.rdb) ;;
            no) save=(--save '' --appendonly no) ;;
            *) nz_die "nz_start_redis: PERSIST must be yes or no"; return 1 ;;
        esac
        rm -f "$dir/redis.pid"
        nz_log "==> starting redis ($dir) on 127.0.0.1:$port"
        "$NZ_REDIS_SERVER" --port "$port" --bind 127.0.0.1 "${save[@]}" \
            --unixsocket "$dir/redis.sock" --unixsocketperm 700 \
            --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir" >/dev/null
        printf '%s\n' "$port" >"$dir/redis.port"
        for i in $(seq 1 100); do
            _nz_redis_ping "$port" && break
            sleep 0.1
            : "$i"
        done
        if ! _nz_redis_ping "$port"; then
            tail -n 20 "$dir/redis.log" >&2 || true
            nz_die "redis failed to start (log: $dir/redis.log)"
            return 1
        fi
    fi
    NZ_REDIS_PORT="$port"
    NZ_TEST_REDIS_URL="redis://127.0.0.1:$port"
    export NZ_REDIS_PORT NZ_TEST_REDIS_URL
}

# nz_stop_redis DIR : stop the instance started by nz_start_redis DIR (by its pid file).
nz_stop_redis() {
    local dir="${1:?usage: nz_stop_redis DIR}" pid i
    [ -d "$dir" ] || return 0
    pid="$(_nz_redis_pid "$dir")" || { rm -f "$dir/redis.pid"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
        : "$i"
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$dir/redis.pid"
}
