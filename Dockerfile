# neuronetz-gateway container image.
#
#   docker build -t neuronetz-gateway .
#   docker run --rm -p 8080:8080 -e DATABASE_URL=postgres://... neuronetz-gateway
#
# Stage 1 builds the release binary; stage 2 is a small Debian image with only that binary,
# CA certificates and the Pingora conf, running as an unprivileged user.

# ---- build -------------------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder

# pingora's zlib-ng (flate2 backend) is built with cmake. Debian packages are not pinned: the
# base image pins the release, and old point versions disappear from the mirrors.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /build

# Dependency layer: the manifests and the lock file with stub sources, so that the crates are
# fetched and compiled once and reused until Cargo.toml or Cargo.lock change. The bench
# package is a workspace member, so its manifest (and the target files it names) must exist
# for cargo to load the workspace, even though only the gateway is built.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml bench/Cargo.toml
RUN mkdir -p src bench/src/bin \
    && printf 'fn main() {}\n' > src/main.rs \
    && : > src/lib.rs \
    && : > bench/src/lib.rs \
    && printf 'fn main() {}\n' > bench/src/bin/ollama_sim.rs \
    && cargo build --release --locked -p neuronetz-gateway \
    && rm -rf src \
        target/release/neuronetz-gateway \
        target/release/deps/neuronetz_gateway-* \
        target/release/deps/libneuronetz_gateway-* \
        target/release/.fingerprint/neuronetz-gateway-*

# The real sources. migrations/ is embedded at compile time (sqlx::migrate!).
COPY src src
COPY migrations migrations
# touch: the copied files may carry mtimes older than the stub build's artifacts.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked -p neuronetz-gateway \
    && cp target/release/neuronetz-gateway /usr/local/bin/neuronetz-gateway

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim

LABEL org.opencontainers.image.title="neuronetz-gateway" \
      org.opencontainers.image.description="Secure, multi-tenant gateway in front of Ollama, built on Pingora" \
      org.opencontainers.image.licenses="Apache-2.0"

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*

# Unprivileged user with fixed ids (10001), so volume ownership is predictable.
# /var/lib/neuronetz is the working directory and /run/neuronetz is there for a pid file or
# an upgrade socket; both belong to that user. /tmp (Pingora's default for both) works too.
RUN groupadd --system --gid 10001 neuronetz \
    && useradd --system --uid 10001 --gid 10001 --no-create-home \
        --home-dir /var/lib/neuronetz --shell /usr/sbin/nologin neuronetz \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/neuronetz /var/lib/neuronetz/spool /run/neuronetz

COPY --from=builder /usr/local/bin/neuronetz-gateway /usr/local/bin/neuronetz-gateway
COPY conf/pingora.yaml /etc/neuronetz/pingora.yaml

USER 10001:10001
WORKDIR /var/lib/neuronetz

# 8080: client listener (LISTEN_ADDR, default 0.0.0.0:8080).
# 9464: metrics (METRICS_ADDR); the binary's default binds it to 127.0.0.1 only, so set
#       METRICS_ADDR=0.0.0.0:9464 to reach it from another container (compose does, on its
#       internal network; never publish it).
EXPOSE 8080 9464

# Liveness: GET /healthz on the port of LISTEN_ADDR (default 8080). The slim image has no
# curl; bash (always present in Debian) opens the TCP connection through /dev/tcp and the
# status line must be "HTTP/1.x 200".
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["bash", "-c", "port=\"${LISTEN_ADDR##*:}\"; exec 3<>\"/dev/tcp/127.0.0.1/${port:-8080}\" || exit 1; printf 'GET /healthz HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n' >&3; IFS= read -r -t 4 status <&3 || exit 1; [[ \"$status\" == HTTP/1.?\\ 200* ]]"]

# SIGTERM = Pingora's graceful shutdown: stop accepting, let in-flight requests finish
# (grace_period_seconds + graceful_shutdown_timeout_seconds in pingora.yaml), then exit.
STOPSIGNAL SIGTERM

ENTRYPOINT ["neuronetz-gateway"]
CMD ["serve", "-c", "/etc/neuronetz/pingora.yaml"]
