# syntax=docker/dockerfile:1
# baby-discord in a container: a release build, then a slim runtime that runs
# the daemon as an unprivileged user.
#
#   docker build -t baby-discord .
#   docker compose up        # three instances, Valkey and PostgreSQL

FROM rust:1-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY benches ./benches
COPY migrations ./migrations
COPY src ./src
# The registry and target caches survive between builds (BuildKit).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin baby-discord \
    && cp target/release/baby-discord /baby-discord

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /data --create-home baby
COPY --from=build /baby-discord /usr/local/bin/baby-discord
USER baby
WORKDIR /data
# Inside a container the adapters listen on every interface.
ENV BABY_TCP=0.0.0.0:9001 BABY_HTTP=0.0.0.0:3001
EXPOSE 9001 3001
HEALTHCHECK --interval=5s --timeout=2s --retries=3 \
    CMD curl -fsS http://127.0.0.1:3001/healthz || exit 1
ENTRYPOINT ["baby-discord"]
