#!/bin/sh
# /init of the blockrep kernel-client test initramfs (runs as PID 1 inside qemu).
# Instructions come from the kernel command line:
#   blockrep.host=10.0.2.2   NBD server address (qemu user networking: the host is 10.0.2.2)
#   blockrep.port=10809      NBD server TCP port
#   blockrep.export=         export name ("" = blockrep's live volume, "@NAME" = a snapshot)
#   blockrep.mode=write      write: mkfs.ext4 + write files + manifest; verify: mount ro + check manifest;
#                            lvm: two disks with LVM (see lvm_mode below)
#   blockrep.mib=8           size of the random file written in write mode
#   blockrep.port2=          lvm mode: the second disk's NBD server port (same host)
#   blockrep.export2=        lvm mode: the second disk's export name
#   blockrep.bin=            attach mode: the blockrep command on the host's root (shared read-only
#                            over virtio-9p, tag hostroot): `blockrep attach --new-identity --mount`
#                            of the export runs in a chroot of it, through the kernel's NBD client
# Output markers on the console (each on its own line):
#   BLOCKREP-MANIFEST: <sha256>  <name>   one per file written (write mode)
#   BLOCKREP-PV: <pv> <pv uuid> <vg> <vg uuid>   lvm mode: every PV lvm sees
#   BLOCKREP-LV: <vg>/<lv> <blkid -o export, one line>   lvm mode: every LV, activated
#   BLOCKREP-LETTER: <vg>/<lv> <text>            lvm mode: the file `letter` in each LV, all mounted
#   BLOCKREP-ATTACH: <json>               attach mode: what `blockrep attach --json` printed
#   BLOCKREP-FILE: <sha256>  <name>       attach mode: every file in the mounted copy
#   BLOCKREP-GUEST-OK mode=<mode>         success
#   BLOCKREP-GUEST-FAIL: <reason>         failure
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# Debian's busybox-static runs its own applets before PATH (SH_STANDALONE): the e2fsprogs tools,
# lvm, blkid and nbd-client copied from the host are therefore called by absolute path.

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
echo 1 > /proc/sys/kernel/printk 2>/dev/null

say() { echo "$@" > /dev/console 2>/dev/null || echo "$@"; }
finish() { sync; poweroff -f; sleep 5; }
fail() { say "BLOCKREP-GUEST-FAIL: $*"; finish; }

BR_host=10.0.2.2 BR_port=10809 BR_export= BR_mode=write BR_mib=8 BR_port2= BR_export2= BR_bin=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        blockrep.*=*)
            key=${arg%%=*}; key=${key#blockrep.}; val=${arg#*=}
            case "$key" in
                host|port|export|mode|mib|port2|export2|bin) eval "BR_$key=\$val" ;;
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

# lvm mode: /dev/nbd0 is a disk (read-only) and /dev/nbd1 its copy with a new identity, each a GPT
# with an LVM PV in partition 1. Both VGs are activated (the original's LVs read-only) and every LV
# is mounted at once, side by side: only distinct PV/VG UUIDs, VG names and filesystem UUIDs allow
# that (XFS refuses a second filesystem with the same UUID). The copy's mounts are written to.
lvmc() { # lvmc [READ-ONLY VG]: lvm's config here (no udev, no lvm.conf; only nbd partitions)
    echo "devices{obtain_device_list_from_udev=0 use_devicesfile=0 hints=\"none\"" \
         "filter=[\"a|^/dev/nbd[0-9]+p[0-9]+\$|\",\"r|.*|\"]}" \
         "activation{udev_sync=0 udev_rules=0 verify_udev_operations=0 monitoring=0" \
         "read_only_volume_list=[${1:+\"$1\"}]} global{use_lvmpolld=0} backup{backup=0 archive=0}"
}
lvm_mode() {
    grep -q xfs /proc/filesystems || fail "xfs not available"
    [ -e /dev/mapper/control ] || fail "no /dev/mapper/control (dm_mod not loaded?)"
    mkdir -p /run/lock/lvm /run/lvm /etc/lvm
    /sbin/nbd-client -N "$BR_export" -R -b 512 -t 60 "$BR_host" "$BR_port" /dev/nbd0 \
        || fail "nbd-client connect to $BR_host:$BR_port"
    /sbin/nbd-client -N "$BR_export2" -b 512 -t 60 "$BR_host" "$BR_port2" /dev/nbd1 \
        || fail "nbd-client connect to $BR_host:$BR_port2"
    # 512-byte sectors: the GPT was written with them (4096 would look for its header at 4 KiB).
    # nbd scans the partition table at the next open after connecting: make that happen now.
    blockdev --rereadpt /dev/nbd0 2>/dev/null; blockdev --rereadpt /dev/nbd1 2>/dev/null
    i=0
    while { [ ! -b /dev/nbd0p1 ] || [ ! -b /dev/nbd1p1 ]; } && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    [ -b /dev/nbd0p1 ] && [ -b /dev/nbd1p1 ] || { cat /proc/partitions; fail "no partition 1 on nbd0 and nbd1"; }
    /sbin/lvm pvs --config "$(lvmc)" --noheadings -o pv_name,pv_uuid,vg_name,vg_uuid > /tmp/pvs 2>/tmp/err \
        || { cat /tmp/err; fail "lvm pvs"; }
    cat /tmp/err  # a duplicate PV would be warned about here
    while read -r line; do say "BLOCKREP-PV: $line"; done < /tmp/pvs
    orig=$(/sbin/lvm pvs --config "$(lvmc)" --noheadings -o vg_name /dev/nbd0p1 2>/dev/null | tr -d ' ')
    [ -n "$orig" ] || fail "no VG on /dev/nbd0p1"
    /sbin/lvm vgchange --config "$(lvmc "$orig")" -ay > /tmp/vgchange 2>&1 \
        || { cat /tmp/vgchange; fail "vgchange -ay"; }
    /sbin/lvm lvs --config "$(lvmc)" --noheadings -o vg_name,lv_name > /tmp/lvs 2>/tmp/err \
        || { cat /tmp/err; fail "lvm lvs"; }
    while read -r vg lv; do
        dev=/dev/mapper/$vg-$lv
        [ -b "$dev" ] || fail "$vg/$lv activated but no $dev"
        /sbin/blkid -p -o export "$dev" > /tmp/blkid || fail "blkid $vg/$lv"
        say "BLOCKREP-LV: $vg/$lv $(tr '\n' ' ' < /tmp/blkid)"
        type=$(sed -n 's/^TYPE=//p' /tmp/blkid)
        opts=rw
        [ "$vg" = "$orig" ] && opts=ro
        mkdir -p "/mnt/$vg-$lv"
        mount -t "$type" -o "$opts" "$dev" "/mnt/$vg-$lv" || fail "mount $vg/$lv ($type, $opts)"
    done < /tmp/lvs
    while read -r vg lv; do  # all mounted now
        say "BLOCKREP-LETTER: $vg/$lv $(cat "/mnt/$vg-$lv/letter")"
        if [ "$vg" != "$orig" ]; then
            echo "the copy is writable" > "/mnt/$vg-$lv/scribble" || fail "write to $vg/$lv"
        fi
    done < /tmp/lvs
    while read -r vg lv; do umount "/mnt/$vg-$lv" || fail "umount $vg/$lv"; done < /tmp/lvs
    /sbin/lvm vgchange --config "$(lvmc)" -an > /tmp/vgchange 2>&1 || { cat /tmp/vgchange; fail "vgchange -an"; }
    /sbin/nbd-client -d /dev/nbd0 || fail "nbd-client -d nbd0"
    /sbin/nbd-client -d /dev/nbd1 || fail "nbd-client -d nbd1"
    say "BLOCKREP-GUEST-OK mode=lvm"
    finish
}
[ "$BR_mode" = lvm ] && lvm_mode

# attach mode: blockrep's own `attach` on a kernel that has NBD (the host has none), run from the
# host's root shared read-only over virtio-9p: it must choose nbd-client (/dev/nbdN), give the copy a
# new identity through the cow overlay, mount it, and `detach` must undo all of it.
attach_mode() {
    mkdir -p /host
    mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostroot /host || fail "9p mount of the host root"
    mount -t proc proc /host/proc && mount -t sysfs sysfs /host/sys && mount -t devtmpfs devtmpfs /host/dev \
        && mount -t tmpfs tmpfs /host/run && mount -t tmpfs tmpfs /host/tmp && mount -t tmpfs tmpfs /host/var/tmp \
        || fail "mounts in the chroot"
    uri="nbd://$BR_host:$BR_port/$BR_export"
    chroot /host /bin/sh -c "cd /tmp && $BR_bin attach '$uri' --new-identity --mount /tmp/m --json" \
        > /host/tmp/attach.json 2> /host/tmp/attach.err || { cat /host/tmp/attach.err; dmesg | tail -5; fail "blockrep attach"; }
    say "BLOCKREP-ATTACH: $(tr -d '\n' < /host/tmp/attach.json)"
    (cd /host/tmp/m && find . -type f ! -name '*.sha256' | sort | while read -r f; do sha256sum "$f"; done) \
        > /tmp/files || fail "reading the mounted copy"
    while read -r line; do say "BLOCKREP-FILE: $line"; done < /tmp/files
    echo scribble > /host/tmp/m/scribble || fail "the copy is not writable"
    chroot /host "$BR_bin" detach /tmp/m > /tmp/detach 2>&1 || { cat /tmp/detach; fail "blockrep detach"; }
    grep -q " /host/tmp/m " /proc/mounts && fail "still mounted after detach"
    [ -e /sys/block/nbd0/pid ] && fail "/dev/nbd0 still connected after detach"
    say "BLOCKREP-GUEST-OK mode=attach"
    finish
}
[ "$BR_mode" = attach ] && attach_mode

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
