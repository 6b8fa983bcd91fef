# The operator's image, for the Helm chart on a real cluster (the local cluster runs the
# operator on the host instead, so this file is not exercised by the tests).
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p portico-operator --bin portico

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/portico /usr/local/bin/portico
# The chart's pod security context runs it as this user, read-only, without capabilities.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/portico"]
