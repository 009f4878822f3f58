# syntax=docker/dockerfile:1
#
# Container image of appproxy-coordinator.
#
#   docker build -t appproxy-coordinator:0.1.0 .      (or: make image)
#   docker run --rm -p 6030:6030 appproxy-coordinator:0.1.0
#
# Two stages: the Rust toolchain compiles a release binary; the runtime stage
# is distroless (glibc, libgcc, CA certificates, no shell, no package manager)
# and runs it as the unprivileged user 10001. The binary links only libc, libm
# and libgcc_s (rustls instead of OpenSSL, SQLite bundled), all of which the
# cc-debian12 image provides; both stages are Debian 12 (bookworm), so the
# glibc versions match.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /build

# 1. Dependencies. This layer depends on the manifests and Cargo.lock only, so
#    a change to the sources reuses the compiled dependencies. Stub targets
#    stand in for the workspace's own code (the coordinator and its two
#    crates, crates/core and crates/client).
COPY Cargo.toml Cargo.lock ./
COPY crates/core/Cargo.toml crates/core/
COPY crates/client/Cargo.toml crates/client/
RUN mkdir -p src crates/core/src crates/client/src \
 && echo 'fn main() {}' > src/main.rs \
 && : > src/lib.rs \
 && : > crates/core/src/lib.rs \
 && : > crates/client/src/lib.rs \
 && cargo build --release --locked --bin appproxy-coordinator \
 && rm -rf src crates/core/src crates/client/src \
      target/release/appproxy-coordinator \
      target/release/.fingerprint/appproxy-* \
      target/release/deps/appproxy_* \
      target/release/deps/libappproxy_*

# 2. The workspace's code. Migrations are embedded in the binary
#    (sqlx::migrate!) at build time. touch: COPY keeps the context's
#    timestamps, which can be older than the stubs; the build must not mistake
#    the real sources for up to date.
COPY crates ./crates
COPY src ./src
COPY migrations ./migrations
RUN touch src/main.rs src/lib.rs crates/core/src/lib.rs crates/client/src/lib.rs \
 && cargo build --release --locked --bin appproxy-coordinator \
 && install -D -m 0755 target/release/appproxy-coordinator /out/usr/local/bin/appproxy-coordinator \
 && mkdir -p /out/data \
 && /out/usr/local/bin/appproxy-coordinator --version

FROM ${RUNTIME_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="appproxy-coordinator" \
      org.opencontainers.image.description="Kubernetes-native control plane for an application proxy" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

COPY --from=builder /out/usr/local/bin/appproxy-coordinator /usr/local/bin/appproxy-coordinator
# The data directory (embedded SQLite, generated tokens), writable by the
# runtime user. In Kubernetes the chart mounts an emptyDir here and makes the
# root filesystem read-only.
COPY --from=builder --chown=10001:10001 /out/data /data

ENV APPPROXY_BIND=0.0.0.0:6030 \
    APPPROXY_DATA_DIR=/data
USER 10001:10001
EXPOSE 6030
# SIGTERM starts the graceful shutdown (stop accepting, drain, release the lease).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/appproxy-coordinator"]
CMD ["serve"]
