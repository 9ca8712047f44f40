#!/usr/bin/env bash
# blockrep demo: a real ext4 filesystem on a blockrep volume, surviving a server restart.
#
#   create a volume -> blockrep serve -> nbdfuse (NBD export as a file) -> losetup -> mkfs.ext4 ->
#   mount -> write files (+ sha256 manifest) -> umount -> e2fsck -> detach -> blockrep stop ->
#   blockrep serve again -> attach + mount -> check every sha256 -> e2fsck -> blockrep info
#
# Needs root (losetup/mount) and the packages from scripts/bootstrap.sh. Environment knobs:
#   BLOCKREP_DEMO_SIZE   volume size (default 1G)
#   BLOCKREP_DEMO_VOL    volume directory (default: inside a temporary directory, removed at exit)
#   BLOCKREP_DEMO_KEEP=1 keep the temporary directory (and the volume) after the demo
#   BLOCKREP             blockrep executable (default .venv/bin/blockrep)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

BLOCKREP="${BLOCKREP:-$ROOT/.venv/bin/blockrep}"
SIZE="${BLOCKREP_DEMO_SIZE:-1G}"
WORK="$(mktemp -d /tmp/blockrep-demo.XXXXXX)"
VOL="${BLOCKREP_DEMO_VOL:-$WORK/vol}"
FUSE_DIR="$WORK/fuse"
MNT="$WORK/mnt"
MANIFEST="$WORK/manifest.sha256"
DISK="$FUSE_DIR/disk"

SERVING=0
URI=""
NBDFUSE_PID=""
LOOP=""

step() { printf '\n==> %s\n' "$*"; }
die() { echo "demo: error: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (losetup and mount need it)"
[ -x "$BLOCKREP" ] || die "$BLOCKREP not found; run scripts/bootstrap.sh first"
for tool in nbdfuse fusermount3 losetup mkfs.ext4 e2fsck sha256sum; do
    command -v "$tool" >/dev/null || die "$tool not installed; run scripts/bootstrap.sh first"
done

detach() {
    if [ -n "$LOOP" ]; then
        if mountpoint -q "$MNT"; then umount "$MNT" || umount -l "$MNT" || true; fi
        losetup -d "$LOOP" || true
        LOOP=""
    fi
    if mountpoint -q "$FUSE_DIR" 2>/dev/null; then fusermount3 -u "$FUSE_DIR" || true; fi
    if [ -n "$NBDFUSE_PID" ]; then
        # nbdfuse exits by itself once unmounted; give it a moment before insisting.
        for _ in $(seq 100); do kill -0 "$NBDFUSE_PID" 2>/dev/null || break; sleep 0.1; done
        kill "$NBDFUSE_PID" 2>/dev/null || true
        wait "$NBDFUSE_PID" 2>/dev/null || true
        NBDFUSE_PID=""
    fi
}

cleanup() {
    local rc=$?
    set +e
    detach
    if [ "$SERVING" = 1 ]; then "$BLOCKREP" stop "$VOL" 2>/dev/null; fi
    if [ "${BLOCKREP_DEMO_KEEP:-0}" = 1 ]; then
        echo "demo: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
    if [ "$rc" -ne 0 ]; then echo "demo: FAILED (exit $rc)" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

serve() {
    SERVING=1   # set first: an interrupted serve may still have left a server behind
    URI="$("$BLOCKREP" serve "$VOL")"   # serve prints the URI it serves
    echo "serving $URI"
}

stop() {
    "$BLOCKREP" stop "$VOL"
    SERVING=0
}

attach() { # nbdfuse the live export to $DISK, then a loop device on it
    local pidfile="$WORK/nbdfuse.pid"
    rm -f "$pidfile"
    mkdir -p "$FUSE_DIR"
    nbdfuse -P "$pidfile" "$DISK" "$URI" &
    NBDFUSE_PID=$!
    for _ in $(seq 200); do
        [ -s "$pidfile" ] && break
        kill -0 "$NBDFUSE_PID" 2>/dev/null || die "nbdfuse exited"
        sleep 0.05
    done
    [ -s "$pidfile" ] && [ -e "$DISK" ] || die "nbdfuse did not come up"
    LOOP="$(losetup -f --show "$DISK")"
    echo "$DISK ($(stat -c %s "$DISK") bytes) is $LOOP"
}

mkdir -p "$MNT"

step "create a $SIZE volume in $VOL"
"$BLOCKREP" create "$VOL" --size "$SIZE"

step "serve it (on $VOL/nbd.sock)"
serve

step "attach with nbdfuse + losetup, mkfs.ext4, mount"
attach
mkfs.ext4 -q -F "$LOOP"
mount -t ext4 "$LOOP" "$MNT"

step "write files: /usr/share/doc and 64 MiB of random data"
mkdir "$MNT/doc"
cp -a /usr/share/doc/. "$MNT/doc/"
dd if=/dev/urandom of="$MNT/random.bin" bs=1M count=64 status=none
(cd "$MNT" && find . -type f -print0 | sort -z | xargs -0 sha256sum) > "$MANIFEST"
echo "$(wc -l < "$MANIFEST") files, $(du -sh "$MNT" | cut -f1) on the filesystem"
sync

step "unmount, e2fsck -fn, detach"
umount "$MNT"
e2fsck -fn "$LOOP"
detach

step "restart the server"
stop
serve

step "attach again, mount, check every sha256"
attach
mount -t ext4 "$LOOP" "$MNT"
(cd "$MNT" && sha256sum -c --quiet "$MANIFEST")
echo "all $(wc -l < "$MANIFEST") files intact after the restart"
umount "$MNT"
e2fsck -fn "$LOOP"
detach
stop

step "blockrep info $VOL"
"$BLOCKREP" info "$VOL"

echo
echo "demo: OK"
