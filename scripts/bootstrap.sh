#!/usr/bin/env bash
# Bootstrap a blockrep checkout: system packages, the virtualenv in .venv/ and the C extension.
# Idempotent; run it from anywhere. Needs root (or sudo) for the apt part on a fresh Debian 12.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { echo "bootstrap: $*" >&2; }

APT_PACKAGES=(
    nbdkit nbdkit-plugin-python libnbd-bin python3-libnbd python3-venv python3-dev
    gcc libzstd-dev qemu-utils qemu-system-x86 fuse3 fio e2fsprogs nbd-server nbd-client
    busybox-static linux-image-amd64 cpio kmod util-linux iproute2
    xfsprogs fdisk btrfs-progs uuid-runtime
    systemd groff-base
)
# Installed without their recommends: lvm2 (attach --new-identity's LVM work, the kernel-client
# test's guest) would bring thin-provisioning-tools, which nothing here uses.
APT_NO_RECOMMENDS=(lvm2)

SUDO=()
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=(sudo -E)
    fi
fi

installed() {
    dpkg-query -W -f='${Status}\n' "$1" 2>/dev/null | grep -q '^install ok installed$'
}

missing=()
for p in "${APT_PACKAGES[@]}"; do
    installed "$p" || missing+=("$p")
done
missing_norec=()
for p in "${APT_NO_RECOMMENDS[@]}"; do
    installed "$p" || missing_norec+=("$p")
done

kernel_present() {
    # What the kernel-client test needs from linux-image-amd64: a kernel image and its nbd module.
    local k
    for k in /boot/vmlinuz-*; do
        [ -e "$k" ] || continue
        local v="${k#/boot/vmlinuz-}"
        if find "/lib/modules/$v" -name 'nbd.ko*' 2>/dev/null | grep -q .; then
            return 0
        fi
    done
    return 1
}

all_missing=("${missing[@]}" "${missing_norec[@]}")
if [ "${#all_missing[@]}" -gt 0 ]; then
    log "installing: ${all_missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The kernel package's hooks would build an initramfs for booting this machine; we never boot
    # it as a host kernel (the test builds its own tiny initramfs), so skip that step.
    export INITRD=No
    apt_opts=(-y -q -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
    "${SUDO[@]}" apt-get update -q >&2 || log "apt-get update failed; trying with the current lists"
    ok=1
    if [ "${#missing[@]}" -gt 0 ]; then
        "${SUDO[@]}" apt-get install "${apt_opts[@]}" "${missing[@]}" >&2 || ok=0
    fi
    if [ "${#missing_norec[@]}" -gt 0 ]; then
        "${SUDO[@]}" apt-get install "${apt_opts[@]}" --no-install-recommends "${missing_norec[@]}" >&2 || ok=0
    fi
    if [ "$ok" = 0 ]; then
        # Post-install hooks (initramfs/bootloader for the kernel package) can fail inside
        # containers; finish configuring what can be configured and judge by what is on disk.
        log "apt-get install reported an error; running dpkg --configure -a and re-checking"
        "${SUDO[@]}" dpkg --configure -a >&2 || true
        "${SUDO[@]}" apt-get install "${apt_opts[@]}" -f >&2 || true
    fi
    still=()
    for p in "${all_missing[@]}"; do
        if ! installed "$p"; then
            if [ "$p" = linux-image-amd64 ] && kernel_present; then
                log "linux-image-amd64 not fully configured, but the kernel and nbd.ko are present"
                continue
            fi
            still+=("$p")
        fi
    done
    if [ "${#still[@]}" -gt 0 ]; then
        log "error: packages still missing: ${still[*]}"
        exit 1
    fi
fi

# The venv must be Debian's /usr/bin/python3 with system site packages: nbdkit's Python plugin embeds
# that interpreter and libnbd's `nbd` module exists only there (DESIGN.md section 3).
venv_ok() {
    [ -x .venv/bin/python ] && [ -r .venv/pyvenv.cfg ] \
        && grep -Eq '^include-system-site-packages *= *true' .venv/pyvenv.cfg \
        && [ "$(.venv/bin/python -c 'import sys; print(sys.base_prefix)' 2>/dev/null)" = /usr ]
}
if ! venv_ok; then
    log "creating .venv (system site packages, Debian's python3)"
    rm -rf .venv
    /usr/bin/python3 -m venv --system-site-packages .venv
fi

log "installing blockrep (editable) with dev extras"
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'

log "building the C extension"
.venv/bin/python -m engine._native_build

log "generating the man page"
scripts/manpage.sh

log "done"
exit 0
