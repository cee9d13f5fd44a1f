# The detour image for users with Docker: `docker build -t detour .`
# The same image as `image/build.sh` (which builds it without a daemon): image/rootfs.sh puts the
# release binary, exactly the shared libraries it needs and uid/gid 65532 entries in an empty
# root filesystem; no shell, no package manager.

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin detour
RUN bash image/rootfs.sh target/release/detour /rootfs

FROM scratch
COPY --from=build /rootfs/ /
USER 65532:65532
WORKDIR /home/nonroot
ENV PATH=/usr/local/bin
LABEL org.opencontainers.image.title=detour \
      org.opencontainers.image.source=https://github.com/detour-dev/detour
ENTRYPOINT ["/usr/local/bin/detour"]
