#!/usr/bin/env bash
# Build (once, cached) a tiny busybox initramfs that boots Debian's kernel under qemu and drives the
# kernel's own NBD client (nbd.ko + nbd-client) against a server on the host, with lvm (lvm2) and
# device-mapper to activate LVs, ext4 and XFS to mount them.
#
# Usage: tests/kernel/build_initramfs.sh [CACHE_DIR]
#   CACHE_DIR defaults to $BLOCKREP_KERNEL_CACHE or tests/kernel/.cache (git-ignored).
#   KVER=<version> selects the kernel (default: the newest /boot/vmlinuz-* with an nbd module).
# Prints two lines on stdout:  KERNEL=/boot/vmlinuz-...  and  INITRD=<cache>/initramfs-<key>.cpio.gz
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="${1:-${BLOCKREP_KERNEL_CACHE:-$HERE/.cache}}"
INIT_SRC="$HERE/guest-init.sh"

die() { echo "build_initramfs: error: $*" >&2; exit 1; }

find_module() { # find_module KVER NAME -> path of NAME.ko[.xz|.zst|.gz] or nothing
    modinfo -k "$1" -n "$2" 2>/dev/null | grep '^/' || true
}

if [ -z "${KVER:-}" ]; then
    for k in $(ls -1 /boot/vmlinuz-* 2>/dev/null | sort -V -r); do
        v="${k#/boot/vmlinuz-}"
        if [ -n "$(find_module "$v" nbd)" ]; then KVER="$v"; break; fi
    done
fi
[ -n "${KVER:-}" ] || die "no /boot/vmlinuz-* with an nbd module (apt-get install linux-image-amd64)"
KERNEL="/boot/vmlinuz-$KVER"
[ -r "$KERNEL" ] || die "$KERNEL not readable"

BUSYBOX="$(command -v busybox || true)"
[ -n "$BUSYBOX" ] || die "busybox not found (apt-get install busybox-static)"
NBD_CLIENT="$(command -v nbd-client || echo /usr/sbin/nbd-client)"
[ -x "$NBD_CLIENT" ] || die "nbd-client not found (apt-get install nbd-client)"
MKE2FS="$(command -v mke2fs || echo /sbin/mke2fs)"
E2FSCK="$(command -v e2fsck || echo /sbin/e2fsck)"
[ -x "$MKE2FS" ] && [ -x "$E2FSCK" ] || die "e2fsprogs not found"
LVM="$(command -v lvm || echo /sbin/lvm)"
[ -x "$LVM" ] || die "lvm not found (apt-get install lvm2)"
BLKID="$(command -v blkid || echo /sbin/blkid)"  # busybox-static has none
[ -x "$BLKID" ] || die "blkid not found (apt-get install util-linux)"
BINARIES=("$NBD_CLIENT" "$MKE2FS" "$E2FSCK" "$LVM" "$BLKID")

# Modules the guest needs, each with its dependencies (modprobe -D prints them in load order).
# virtio_pci + virtio_net: the NIC; nbd: the block device; ext4 (+ crc32c), xfs: the filesystems;
# dm_mod: device-mapper, for LVM's LVs.
WANT_MODULES=(virtio_pci virtio_net nbd crc32c_generic ext4 xfs dm_mod 9p 9pnet_virtio)
declare -a MODFILES=()
declare -A SEEN=() MODARGS=()
for m in "${WANT_MODULES[@]}"; do
    deps="$(modprobe -S "$KVER" -D "$m" 2>/dev/null)" || die "modprobe -D $m failed for $KVER"
    while read -r verb path args; do
        [ "$verb" = insmod ] || continue     # 'builtin ...' lines need nothing
        [ -n "${SEEN[$path]:-}" ] && continue
        SEEN[$path]=1
        MODFILES+=("$path")
        MODARGS[$path]="$args"  # options from modprobe.d (nbd-client's: max_part=15)
    done <<< "$deps"
done

# The shared libraries of the binaries (what copy_with_libs copies).
libs_of() { ldd "$@" | grep -o '/[^ ]*' | grep -v ':$' | sort -u; }

# Cache key: everything that goes into the image.
KEY="$( {
    echo "$KVER"
    cat "${BASH_SOURCE[0]}" "$INIT_SRC"
    sha256sum "$BUSYBOX" "${BINARIES[@]}" $(libs_of "${BINARIES[@]}") "${MODFILES[@]}"
} | sha256sum | cut -c1-16 )"
mkdir -p "$CACHE"
OUT="$CACHE/initramfs-$KEY.cpio.gz"
if [ -s "$OUT" ]; then
    echo "KERNEL=$KERNEL"
    echo "INITRD=$OUT"
    exit 0
fi

ROOT="$(mktemp -d "$CACHE/root.XXXXXX")"
trap 'rm -rf "$ROOT"' EXIT
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,mnt,tmp,lib/modules}

# busybox and its applets
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list-full); do
    [ -e "$ROOT/$applet" ] || ln -s /bin/busybox "$ROOT/$applet"
done

# Dynamically linked host binaries with their shared libraries (and the loader).
copy_with_libs() { # copy_with_libs SRC DEST_IN_ROOT
    rm -f "$ROOT/$2"
    cp -L "$1" "$ROOT/$2"
    ldd "$1" | grep -o '/[^ ]*' | while read -r lib; do
        [ -e "$ROOT/$lib" ] && continue
        mkdir -p "$ROOT/$(dirname "$lib")"
        cp -L "$lib" "$ROOT/$lib"
    done
}
copy_with_libs "$NBD_CLIENT" /sbin/nbd-client
copy_with_libs "$MKE2FS" /sbin/mke2fs
copy_with_libs "$E2FSCK" /sbin/e2fsck
copy_with_libs "$LVM" /sbin/lvm
copy_with_libs "$BLKID" /sbin/blkid
ln -sf mke2fs "$ROOT/sbin/mkfs.ext4"
[ -r /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$ROOT/etc/mke2fs.conf"
# e2fsck looks these up; an empty mtab keeps it from complaining.
: > "$ROOT/etc/fstab"
ln -sf /proc/mounts "$ROOT/etc/mtab"

# Kernel modules, decompressed, plus the load order for /init.
: > "$ROOT/lib/modules/load.list"
for path in "${MODFILES[@]}"; do
    base="$(basename "$path")"
    case "$base" in
        *.ko.xz)  name="${base%.xz}";  xz -dc "$path" > "$ROOT/lib/modules/$name" ;;
        *.ko.zst) name="${base%.zst}"; zstd -qdc "$path" > "$ROOT/lib/modules/$name" ;;
        *.ko.gz)  name="${base%.gz}";  gzip -dc "$path" > "$ROOT/lib/modules/$name" ;;
        *.ko)     name="$base";        cp "$path" "$ROOT/lib/modules/$name" ;;
        *) die "unexpected module file $path" ;;
    esac
    args="${MODARGS[$path]}"
    # nbd: partitions on /dev/nbdN (the LVM test's PVs are partitions), whatever modprobe.d says
    [ "$name" = nbd.ko ] && [[ "$args" != *max_part=* ]] && args="$args max_part=15"
    echo "$name $args" >> "$ROOT/lib/modules/load.list"
done

install -m 0755 "$INIT_SRC" "$ROOT/init"

TMP_OUT="$OUT.tmp.$$"
(cd "$ROOT" && find . -print0 | cpio --null -o -H newc --quiet -R 0:0 | gzip -1) > "$TMP_OUT"
mv -f "$TMP_OUT" "$OUT"
# Drop older builds.
find "$CACHE" -maxdepth 1 -name 'initramfs-*.cpio.gz' ! -name "$(basename "$OUT")" -delete

echo "KERNEL=$KERNEL"
echo "INITRD=$OUT"
