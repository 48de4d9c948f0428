# syntax=docker/dockerfile:1
# Multi-stage build: compile in the Rust image, run from distroless (no shell, glibc only),
# as a non-root user. Swagger UI is vendored, so the build downloads nothing but crates.

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Build settings: the allocator's and the bundled SQLite's compile-time options (see .cargo/config.toml).
COPY .cargo ./.cargo
COPY src ./src
COPY crates ./crates
COPY ui ./ui
COPY migrations ./migrations
COPY openapi ./openapi
COPY keybroker.example.toml ./
RUN cargo build --release --locked --bin keybroker \
    && strip target/release/keybroker

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keybroker /usr/local/bin/keybroker
USER nonroot:nonroot
EXPOSE 8080
ENV KEYBROKER_LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/keybroker"]
CMD ["serve", "--config", "/etc/keybroker/keybroker.toml"]
