# syntax=docker/dockerfile:1
#
# cachecoord container image.
#
#   docker build -t cachecoord .
#   docker run --rm -p 50051:50051 -e REDIS_URL=redis://:secret@redis:6379/0 cachecoord
#
# Two stages: a Debian bookworm Rust toolchain builds both binaries, and a
# distroless (glibc, no shell, non-root) bookworm image runs them. Keep the two
# on the same Debian release so the binaries' glibc matches the runtime's.
#
# Only Cargo.toml, Cargo.lock, build.rs, proto/, src/ and the manifest of the
# bench/ workspace member are copied in (see .dockerignore); the bench is not
# built, but cargo needs its manifest (and a stub source) to load the workspace.

ARG RUST_VERSION=1.95

# ---------------------------------------------------------------------------
FROM rust:${RUST_VERSION}-bookworm AS builder

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src

# 1. Dependencies: build them against stub sources, so this layer is reused
#    until Cargo.toml or Cargo.lock changes. build.rs is stubbed as well, so
#    editing a .proto does not rebuild every dependency (the build script's own
#    build-dependencies, tonic-prost-build and protoc-bin-vendored, are still
#    compiled here). protoc comes from protoc-bin-vendored: nothing to install.
COPY Cargo.toml Cargo.lock ./
COPY bench/Cargo.toml ./bench/
COPY torture/Cargo.toml ./torture/
RUN mkdir -p src/bin bench/src torture/src \
    && echo 'fn main() {}' > bench/src/main.rs \
    && echo 'fn main() {}' > torture/src/main.rs \
    && echo 'fn main() {}' > build.rs \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/healthcheck.rs \
    && touch src/lib.rs \
    && cargo build --locked --release --bins

# 2. The real sources. COPY keeps the files' own mtimes, which can be older
#    than the stub artifacts above, so touch them: otherwise cargo may judge
#    the stubs fresh and ship them. Then smoke-check that the real binaries
#    were built, not the stubs: the server prints its version, and the health
#    check fails against a closed port.
COPY build.rs ./
COPY proto ./proto
COPY src ./src
RUN touch build.rs src/main.rs src/lib.rs src/bin/healthcheck.rs \
    && cargo build --locked --release --bins \
    && [[ "$(./target/release/cachecoord --version)" == "cachecoord "* ]] \
    && ! ./target/release/cachecoord-healthcheck http://127.0.0.1:1 2>/dev/null \
    && mkdir -p /out \
    && cp target/release/cachecoord target/release/cachecoord-healthcheck /out/

# ---------------------------------------------------------------------------
FROM gcr.io/distroless/cc-debian12:nonroot

LABEL org.opencontainers.image.title="cachecoord" \
      org.opencontainers.image.description="One gRPC contract in front of Redis for caching, sessions, rate limits, locks and counters" \
      org.opencontainers.image.licenses="Apache-2.0"

COPY --from=builder /out/cachecoord /out/cachecoord-healthcheck /usr/local/bin/

# Every other setting (REDIS_URL, CACHECOORD_*, RUST_LOG) is read from the
# environment too; see `cachecoord --help`.
ENV CACHECOORD_LISTEN=0.0.0.0:50051 \
    CACHECOORD_LOG_FORMAT=json

EXPOSE 50051

# distroless "nonroot" (65532), numeric so runAsNonRoot checks can see it.
USER 65532:65532

# SIGTERM: health goes NOT_SERVING, in-flight RPCs finish within
# CACHECOORD_SHUTDOWN_GRACE (10s by default); give the container longer.
STOPSIGNAL SIGTERM

# Exec form: distroless has no shell. The probe asks 127.0.0.1 on the port of
# CACHECOORD_LISTEN (so it follows a changed port) over grpc.health.v1, and
# gives up by itself after 3s. With CACHECOORD_TLS_CERT set it speaks TLS and
# requires the server to present exactly that certificate;
# CACHECOORD_HEALTHCHECK_TLS_CERT/_KEY give it a client certificate for mTLS.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/cachecoord-healthcheck"]

ENTRYPOINT ["/usr/local/bin/cachecoord"]
