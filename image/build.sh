#!/usr/bin/env bash
# Builds the detour container image without a daemon and without a base image: an OCI layout
# made from scratch by umoci (Debian `umoci`), one layer holding what image/rootfs.sh puts there
# (the binary, exactly the shared libraries it needs, uid/gid 65532; no shell, no package
# manager), run as 65532:65532 with entrypoint /usr/local/bin/detour.
#
#   image/build.sh [--binary target/release/detour] [--out target/image] [--tag VERSION]
#                  [--docker-archive FILE]
#
# The layout is written to OUT/oci (image OUT/oci:TAG); `skopeo copy oci:OUT/oci:TAG
# docker-archive:detour.tar:detour:TAG` (or --docker-archive) gives a file `docker load` takes.
# The Dockerfile builds the same image with Docker.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

binary=target/release/detour
out=target/image
tag=
archive=
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --docker-archive) archive=$2; shift 2 ;;
    *) echo "usage: $0 [--binary FILE] [--out DIR] [--tag TAG] [--docker-archive FILE]" >&2; exit 2 ;;
  esac
done
for tool in umoci ldd; do
  command -v "$tool" >/dev/null || { echo "$0: $tool is missing (apt-get install umoci)" >&2; exit 1; }
done
[ -x "$binary" ] || { echo "$0: no binary at $binary (cargo build --release --locked)" >&2; exit 1; }
[ -n "$tag" ] || tag=$("$binary" --version | awk '{print $2}')

layout=$out/oci
bundle=$out/bundle
rm -rf "$layout" "$bundle"
mkdir -p "$out"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
# --rootless: the rootfs is owned by whoever runs this (root in CI), not chowned per file.
umoci unpack --rootless --image "$layout:$tag" "$bundle"

bash image/rootfs.sh "$binary" "$bundle/rootfs"

umoci repack --image "$layout:$tag" "$bundle"
umoci config --image "$layout:$tag" \
  --author detour \
  --config.user 65532:65532 \
  --config.entrypoint /usr/local/bin/detour \
  --config.workingdir /home/nonroot \
  --config.env PATH=/usr/local/bin \
  --config.label org.opencontainers.image.title=detour \
  --config.label "org.opencontainers.image.version=$tag" \
  --config.label org.opencontainers.image.source=https://github.com/detour-dev/detour
umoci gc --layout "$layout"
rm -rf "$bundle"

if [ -n "$archive" ]; then
  command -v skopeo >/dev/null || { echo "$0: skopeo is missing (apt-get install skopeo)" >&2; exit 1; }
  rm -f "$archive"
  skopeo copy --quiet "oci:$layout:$tag" "docker-archive:$archive:detour:$tag"
fi
echo "$layout:$tag"
