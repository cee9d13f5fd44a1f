#!/usr/bin/env bash
# Fills ROOTFS with what the detour image holds, and nothing else (no shell, no package
# manager): the binary at /usr/local/bin/detour, every library the dynamic loader resolves for
# it and the loader itself at their own paths (from `ldd`), /etc/passwd and /etc/group entries
# for uid/gid 65532 (`nonroot`, home /home/nonroot) and a /tmp.
# Used by image/build.sh (no daemon) and by the Dockerfile, so both make the same image.
#
#   image/rootfs.sh BINARY ROOTFS
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 BINARY ROOTFS" >&2; exit 2; }
binary=$1
rootfs=$2

install -D -m 0755 "$binary" "$rootfs/usr/local/bin/detour"
# `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` lines, and the loader's line, which has
# no `=>`: `/lib64/ld-linux-x86-64.so.2 (0x...)`. linux-vdso has no file.
ldd "$binary" | awk '/=> \// {print $3} /^[ \t]*\/[^ ]+ \(/ {print $1}' | while read -r lib; do
  install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
done
install -d -m 0755 "$rootfs/etc" "$rootfs/home/nonroot"
install -d -m 1777 "$rootfs/tmp"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\nnonroot:x:65532:\n' > "$rootfs/etc/group"
