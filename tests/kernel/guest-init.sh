#!/bin/sh
# /init of the blockrep kernel-client test initramfs (runs as PID 1 inside qemu).
# Instructions come from the kernel command line:
#   blockrep.host=10.0.2.2   NBD server address (qemu user networking: the host is 10.0.2.2)
#   blockrep.port=10809      NBD server TCP port
#   blockrep.export=         export name ("" = blockrep's live volume, "@NAME" = a snapshot)
#   blockrep.mode=write      write: mkfs.ext4 + write files + manifest; verify: mount ro + check manifest
#   blockrep.mib=8           size of the random file written in write mode
# Output markers on the console (each on its own line):
#   BLOCKREP-MANIFEST: <sha256>  <name>   one per file written (write mode)
#   BLOCKREP-GUEST-OK mode=<mode>         success
#   BLOCKREP-GUEST-FAIL: <reason>         failure
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Debian's busybox-static runs its own applets before PATH (SH_STANDALONE): the e2fsprogs tools
# and nbd-client copied from the host are therefore called by absolute path.

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo 1 > /proc/sys/kernel/printk 2>/dev/null

say() { echo "$@" > /dev/console 2>/dev/null || echo "$@"; }
finish() { sync; poweroff -f; sleep 5; }
fail() { say "BLOCKREP-GUEST-FAIL: $*"; finish; }

BR_host=10.0.2.2 BR_port=10809 BR_export= BR_mode=write BR_mib=8
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        blockrep.*=*)
            key=${arg%%=*}; key=${key#blockrep.}; val=${arg#*=}
            case "$key" in
                host|port|export|mode|mib) eval "BR_$key=\$val" ;;
            esac ;;
    esac
done
say "blockrep-guest: mode=$BR_mode server=$BR_host:$BR_port export='$BR_export'"

# Kernel modules, in dependency order (list written by build_initramfs.sh). Some may legitimately
# fail (e.g. crc32c-intel on a CPU without SSE4.2); what matters is checked below.
while read -r mod args; do
    [ -n "$mod" ] && insmod "/lib/modules/$mod" $args 2>/dev/null
done < /lib/modules/load.list
grep -q ext4 /proc/filesystems || fail "ext4 not available"

# Network: static address for qemu user networking.
ip link set lo up
i=0
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /sys/class/net/eth0 ] || fail "no eth0"
ip link set eth0 up || fail "eth0 up"
ip addr add 10.0.2.15/24 dev eth0 || fail "ip addr"
ip route add default via 10.0.2.2 || fail "ip route"

i=0
while [ ! -e /dev/nbd0 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
[ -b /dev/nbd0 ] || fail "no /dev/nbd0 (nbd module not loaded?)"

ro=
[ "$BR_mode" = verify ] && ro=-R
/sbin/nbd-client -N "$BR_export" $ro -b 4096 -t 60 "$BR_host" "$BR_port" /dev/nbd0 \
    || fail "nbd-client connect to $BR_host:$BR_port"
size=$(cat /sys/block/nbd0/size)
say "blockrep-guest: /dev/nbd0 connected, $size sectors"
[ "$size" -gt 0 ] || fail "nbd0 has size 0"

mkdir -p /mnt
case "$BR_mode" in
write)
    /sbin/mke2fs -q -t ext4 -F -E lazy_itable_init=0,lazy_journal_init=0 /dev/nbd0 || fail "mkfs.ext4"
    mount -t ext4 /dev/nbd0 /mnt || fail "mount"
    mkdir /mnt/data || fail "mkdir"
    dd if=/dev/urandom of=/mnt/data/random.bin bs=1M count="$BR_mib" 2>/dev/null || fail "dd"
    echo "written by a Linux kernel NBD client (nbd.ko) through blockrep" > /mnt/data/hello.txt \
        || fail "write hello"
    seq 1 50000 > /mnt/data/numbers.txt || fail "write numbers"
    (cd /mnt/data && sha256sum random.bin hello.txt numbers.txt > /mnt/MANIFEST.sha256) \
        || fail "manifest"
    sync
    while read -r line; do say "BLOCKREP-MANIFEST: $line"; done < /mnt/MANIFEST.sha256
    umount /mnt || fail "umount"
    /sbin/e2fsck -fn /dev/nbd0 > /tmp/fsck.log 2>&1 || { cat /tmp/fsck.log; fail "e2fsck in guest"; }
    ;;
verify)
    mount -t ext4 -o ro /dev/nbd0 /mnt || fail "mount ro"
    (cd /mnt/data && sha256sum -c /mnt/MANIFEST.sha256) || fail "sha256sum -c"
    umount /mnt || fail "umount"
    ;;
*)
    fail "unknown mode $BR_mode"
    ;;
esac

/sbin/nbd-client -d /dev/nbd0 || fail "nbd-client -d"
say "BLOCKREP-GUEST-OK mode=$BR_mode"
finish
