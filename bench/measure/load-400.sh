# Sourced by perf-stat.sh and thread-cpu.sh: runs the chat-stream scenario (400 req/s, 30 s)
# against one proxy alone in the background and finds that proxy's process once it serves.
#
# load_400_start BIN_DIR TARGET OUT_DIR
#   BIN_DIR  holds ollama-sim, nz-passthrough and neuronetz-gateway (a release build)
#   TARGET   gateway or passthrough
# Sets `load_pid` (the proxy, after 10 s of load: measure for 15 s from then, 6 000 requests)
# and `load_job` (the run; `wait "$load_job"` when done). Run from the repository root.
# COMPARE_ARGS (optional) is appended to the `nz-bench compare` command line, e.g.
#   COMPARE_ARGS="--gateway-env REDIS_URL=" for the gateway's in-process limits.

# Requests measured in the 15 s window at 400 req/s.
LOAD_400_REQUESTS=6000

load_400_start() {
    local bin_dir=$1 target=$2 out=$3 pattern
    case "$target" in
        gateway) pattern="$bin_dir/neuronetz-gateway serve" ;;
        passthrough) pattern="$bin_dir/nz-passthrough" ;;
        *) echo "target must be gateway or passthrough" >&2; return 2 ;;
    esac
    target/release/nz-bench compare --bin-dir "$bin_dir" --env-file target/nz-stores/env \
        --scenario bench/scenarios/chat-stream.yaml --targets "$target" --duration 30s --quiet ${COMPARE_ARGS:-} \
        > "$out/run.log" 2>&1 &
    load_job=$!
    sleep 10
    load_pid=$(pgrep -f "$pattern" | head -1)
    if [ -z "$load_pid" ]; then
        echo "no $target process found; see $out/run.log" >&2
        return 1
    fi
}
