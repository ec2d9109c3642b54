#!/usr/bin/env bash
# Build the uvmctl test guest: a Debian kernel plus a small busybox initramfs
# running the uvmctl guest agent (see README.md in this directory).
#
# Usage: guest/build.sh [OUTDIR]
#   OUTDIR defaults to ${UVMCTL_GUEST_DIR:-/var/cache/uvmctl/guest}.
#
# Produces OUTDIR/vmlinuz, OUTDIR/initrd.img and OUTDIR/manifest, plus
# OUTDIR/vmlinux: the same kernel uncompressed (an ELF with a PVH entry
# point). QEMU boots '-kernel vmlinux' directly through PVH, skipping the
# in-guest decompression, which saves ~7 s per boot under TCG.
# Cached: when the outputs exist, match the manifest, and the inputs (this
# script, the guest files, the kernel and busybox package versions) are
# unchanged, it does nothing and exits 0.
#
# Environment:
#   UVMCTL_GUEST_DIR          default output directory
#   UVMCTL_GUEST_KERNEL_PKG   kernel package to use instead of the one that
#                             linux-image-amd64 depends on (e.g.
#                             linux-image-6.1.0-48-amd64)
#   UVMCTL_GUEST_FORCE=1      rebuild even if the cache is valid
#   UVMCTL_GUEST_VMLINUX=0    do not produce vmlinux (saves ~66 MB)
#   TMPDIR                    where the temporary work directory is made
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUT=${1:-${UVMCTL_GUEST_DIR:-/var/cache/uvmctl/guest}}

# Guest files copied into the initramfs (all part of the cache key).
GUEST_FILES=(init agent uevent vsock-io.c)

# Modules the guest loads at boot (busybox modprobe resolves dependencies
# from modules.dep). REQUIRED ones must exist (or be built in), OPTIONAL
# ones are included when the kernel has them.
REQUIRED_MODULES=(
    virtio_pci virtio_blk virtio_net virtio_console virtio_balloon
    scsi_mod virtio_scsi sd_mod
    9p 9pnet_virtio
    nfit libnvdimm nd_pmem nd_btt
)
OPTIONAL_MODULES=(
    sr_mod virtio_mem virtio_pmem virtio_rng
    vmw_vsock_virtio_transport af_packet
    pvpanic_mmio pvpanic_pci
    button evdev
)
# In the image but not loaded at boot (saves ~0.4 s under TCG): the kernel
# asks modprobe for them when needed (mount -t ext4 -> fs-ext4,
# crypto-crc32c), and the uevent helper loads drivers by MODALIAS.
ONDEMAND_MODULES=(ext4 crc32c_generic crc32c_intel)

log() { printf 'guest/build.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# --------------------------------------------------------------- apt helpers
APT_UPDATED=0
apt_update_once() {
    [ "$APT_UPDATED" = 1 ] && return 0
    APT_UPDATED=1
    log "apt-get update"
    apt-get update -qq >&2 || die "apt-get update failed"
}

# Run an apt command; on failure run 'apt-get update' once and retry.
apt_retry() {
    if "$@"; then return 0; fi
    [ "$APT_UPDATED" = 1 ] && return 1
    apt_update_once
    "$@"
}

apt_install() {
    [ "$#" -gt 0 ] || return 0
    [ "$(id -u)" = 0 ] || die "missing packages ($*) and not root: install them first"
    log "installing: $*"
    local alog
    alog=$(mktemp "${TMPDIR:-/tmp}/uvmctl-guest-apt.XXXXXX")
    if ! apt_retry env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -q --no-install-recommends "$@" >"$alog" 2>&1; then
        cat "$alog" >&2
        rm -f "$alog"
        die "apt-get install $* failed"
    fi
    rm -f "$alog"
}

# ------------------------------------------------------------ cache check
for f in "${GUEST_FILES[@]}"; do
    [ -f "$HERE/$f" ] || die "missing guest file $HERE/$f"
done
# Everything of ours that goes into the image.
FILES_HASH=$(
    {
        printf 'required %s\noptional %s\nondemand %s\nkpkg %s\nvmlinux %s\n' \
            "${REQUIRED_MODULES[*]}" "${OPTIONAL_MODULES[*]}" "${ONDEMAND_MODULES[*]}" \
            "${UVMCTL_GUEST_KERNEL_PKG:-}" "${UVMCTL_GUEST_VMLINUX:-1}"
        for f in build.sh "${GUEST_FILES[@]}"; do
            printf 'file %s %s\n' "$f" "$(sha256sum <"$HERE/$f" | cut -d' ' -f1)"
        done
    } | sha256sum | cut -d' ' -f1
)
# apt-cache takes ~1 s a call on hosts without pkgcache.bin, so the quick
# check keys on the apt lists themselves: same lists => same versions.
LISTS_FP=$(stat -c '%n %s %Y' /var/lib/apt/lists/*Packages* 2>/dev/null | sha256sum | cut -d' ' -f1)
FAST_KEY=$(printf '%s %s\n' "$FILES_HASH" "$LISTS_FP" | sha256sum | cut -d' ' -f1)

mf() { sed -n "s/^${1//./\\.}=//p" "$OUT/manifest" 2>/dev/null | head -n 1; }

outputs_valid() { # manifest present and every output it lists matches it
    # Size + mtime, as recorded when installed (hashing the 66 MB vmlinux on
    # every check would cost ~1 s); the sha256s are in the manifest too.
    local f outputs
    outputs=$(mf outputs)
    [ -n "$outputs" ] || return 1
    for f in $outputs; do
        [ -f "$OUT/$f" ] || return 1
        [ "$(stat -c '%s %Y' "$OUT/$f")" = "$(mf "${f}_stat")" ] || return 1
    done
}

FORCE=${UVMCTL_GUEST_FORCE:-0}
if [ "$FORCE" != 1 ] && [ "$(mf fast_key)" = "$FAST_KEY" ] && outputs_valid; then
    log "up to date: $OUT ($(mf kernel_package) $(mf kernel_package_version), busybox $(mf busybox_package_version))"
    exit 0
fi

# ------------------------------------------------------------ versions
# One apt-cache call: the kernel meta package (or the override) + busybox.
apt_show() { # PKG... -> "pkg Version v" / "pkg Depends ..." lines
    apt-cache show --no-all-versions "$@" 2>/dev/null | awk '
        /^Package: / { p = $2 }
        /^Version: / { print p, "Version", $2 }
        /^Depends: / { sub(/^Depends: /, ""); print p, "Depends", $0 }'
}
KPKG=${UVMCTL_GUEST_KERNEL_PKG:-}
SHOW=$(apt_show "${KPKG:-linux-image-amd64}" busybox-static)
if ! printf '%s\n' "$SHOW" | grep -q '^busybox-static Version'; then
    apt_update_once
    SHOW=$(apt_show "${KPKG:-linux-image-amd64}" busybox-static)
fi
BBVERSION=$(printf '%s\n' "$SHOW" | sed -n 's/^busybox-static Version //p' | head -n 1)
[ -n "$BBVERSION" ] || die "no candidate version for busybox-static"
if [ -z "$KPKG" ]; then
    deps=$(printf '%s\n' "$SHOW" | sed -n 's/^linux-image-amd64 Depends //p' | head -n 1)
    [ -n "$deps" ] || die "cannot resolve linux-image-amd64 (apt-cache show gave nothing)"
    # Depends: linux-image-6.1.0-48-amd64 (= 6.1.172-1) [| ...-unsigned ...]
    dep=$(printf '%s\n' "$deps" | tr ',|' '\n\n' | sed 's/^ *//' \
        | grep -E '^linux-image-[0-9][^ ]*-amd64( |$)' | head -n 1 || true)
    [ -n "$dep" ] || die "no linux-image-*-amd64 in linux-image-amd64 Depends: $deps"
    KPKG=${dep%% *}
    KVERSION=$(printf '%s\n' "$dep" | sed -n 's/.*(= *\([^) ]*\)).*/\1/p')
    [ -n "$KVERSION" ] || KVERSION=$(apt_show "$KPKG" | sed -n "s/^$KPKG Version //p" | head -n 1)
else
    KVERSION=$(printf '%s\n' "$SHOW" | sed -n "s/^$KPKG Version //p" | head -n 1)
fi
[ -n "$KVERSION" ] || die "no candidate version for $KPKG"

INPUT_HASH=$(printf 'files %s\nkernel %s %s\nbusybox %s\n' "$FILES_HASH" \
    "$KPKG" "$KVERSION" "$BBVERSION" | sha256sum | cut -d' ' -f1)

# Same inputs as the existing build (e.g. the apt lists were refreshed but
# no version changed): just record the new quick-check key.
refresh_fast_key() { # best effort (OUT may be read-only for us)
    sed -i "s/^fast_key=.*/fast_key=$FAST_KEY/" "$OUT/manifest" 2>/dev/null || true
}
if [ "$FORCE" != 1 ] && [ "$(mf input_sha256)" = "$INPUT_HASH" ] && outputs_valid; then
    refresh_fast_key
    log "up to date: $OUT ($KPKG $KVERSION, busybox $BBVERSION)"
    exit 0
fi

# ------------------------------------------------------------ host tools
# Needed for every build: dpkg-deb (dpkg), cpio, gzip, sha256sum (coreutils),
# flock (util-linux). xz/zstd only if the kernel ships compressed modules.
missing=()
command -v apt-get >/dev/null || die "apt-get not found (Debian-like host required)"
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v cpio >/dev/null || missing+=(cpio)
command -v gzip >/dev/null || missing+=(gzip)
if [ "${UVMCTL_GUEST_VMLINUX:-1}" = 1 ]; then
    command -v xz >/dev/null || missing+=(xz-utils)
fi
# vsock-io.c, linked statically (the initramfs has no C library).
command -v gcc >/dev/null || missing+=(gcc)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
apt_install "${missing[@]}"

mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
# Serialise concurrent builds of the same OUT, then re-check the cache.
exec 9>"$OUT/.lock"
flock 9
if [ "$FORCE" != 1 ] && [ "$(mf input_sha256)" = "$INPUT_HASH" ] && outputs_valid; then
    refresh_fast_key
    log "up to date: $OUT (built by a concurrent run)"
    exit 0
fi

START=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/uvmctl-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
chmod 755 "$WORK"   # apt-get download drops privileges to _apt
log "building into $OUT (work dir $WORK)"

# ------------------------------------------------------------ download
mkdir -p "$WORK/debs"
chmod 777 "$WORK/debs"
(
    cd "$WORK/debs"
    apt_retry apt-get download -qq "$KPKG=$KVERSION" "busybox-static=$BBVERSION" >&2
) || die "apt-get download of $KPKG=$KVERSION busybox-static=$BBVERSION failed"
KDEB=$(ls "$WORK"/debs/"$KPKG"_*.deb)
BBDEB=$(ls "$WORK"/debs/busybox-static_*.deb)

# ------------------------------------------------------------ unpack
log "unpacking $(basename "$KDEB")"
dpkg -x "$KDEB" "$WORK/kernel"
dpkg -x "$BBDEB" "$WORK/busybox"
BB=$WORK/busybox/bin/busybox
[ -x "$BB" ] || die "busybox binary not found in $BBDEB"
BBVERSION_RUN=$("$BB" --help 2>&1 | sed -n '1s/^BusyBox \(v[^ ]*\).*/\1/p' || true)

KVER=$(ls "$WORK/kernel/lib/modules")
[ "$(printf '%s\n' "$KVER" | wc -l)" = 1 ] || die "expected one module dir, got: $KVER"
VMLINUZ=$WORK/kernel/boot/vmlinuz-$KVER
[ -f "$VMLINUZ" ] || die "kernel image $VMLINUZ not found"
KMOD=$WORK/kernel/lib/modules/$KVER

# ------------------------------------------------------------ root tree
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,sbin,usr/bin,usr/sbin,etc/uvmctl,proc,sys,dev,run,tmp,mnt,root,var/log,"lib/modules/$KVER"}
ln -s ../run "$ROOT/var/run"
chmod 1777 "$ROOT/tmp"
install -m 0755 "$BB" "$ROOT/bin/busybox"
# Applet symlinks (relative, so they work wherever the tree is unpacked).
"$BB" --list-full | while IFS= read -r applet; do
    case "$applet" in linuxrc|*/init) continue ;; esac
    [ -e "$ROOT/$applet" ] && continue
    dir=$(dirname "$applet")
    up=$(printf '%s\n' "$dir" | sed 's|[^/][^/]*|..|g')
    ln -s "$up/bin/busybox" "$ROOT/$applet"
done
[ -e "$ROOT/bin/sh" ] || ln -s busybox "$ROOT/bin/sh"

install -m 0755 "$HERE/init" "$ROOT/init"
install -m 0755 "$HERE/agent" "$ROOT/sbin/uvmctl-agent"
install -m 0755 "$HERE/uevent" "$ROOT/sbin/uvmctl-uevent"
gcc -static -Os -s -Wall -Werror -o "$ROOT/bin/vsock-io" "$HERE/vsock-io.c" \
    || die "cannot build vsock-io (gcc -static)"
printf 'root:x:0:0:root:/root:/bin/sh\n' >"$ROOT/etc/passwd"
printf 'root:x:0:\n' >"$ROOT/etc/group"
printf '# mdev: devtmpfs already creates nodes; defaults (root 0660) are fine\n' >"$ROOT/etc/mdev.conf"
# busybox acpid: ACPI power button -> poweroff (QMP system_powerdown works)
mkdir -p "$ROOT/etc/acpi/PWRF"
printf '#!/bin/sh\nsync\nexec poweroff -f\n' >"$ROOT/etc/acpi/PWRF/00000080"
chmod 0755 "$ROOT/etc/acpi/PWRF/00000080"
# /dev/console so the kernel can give /init its stdio (needs root; /init
# re-opens the console after mounting devtmpfs anyway).
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true

# ------------------------------------------------------------ modules
declare -A MODPATH=() BUILTIN=() PICKED=()
while IFS= read -r rel; do
    n=${rel##*/}; n=${n%%.ko*}; n=${n//-/_}
    MODPATH[$n]=$rel
done < <(cd "$KMOD" && find kernel -name '*.ko' -o -name '*.ko.*')
if [ -f "$KMOD/modules.builtin" ]; then
    while IFS= read -r rel; do
        n=${rel##*/}; n=${n%%.ko*}; n=${n//-/_}
        BUILTIN[$n]=1
    done <"$KMOD/modules.builtin"
fi

# Copy one module (decompressed) into the root tree and echo its deps.
copy_module() { # NAME -> prints dependency names
    local rel=${MODPATH[$1]} dst
    dst=$ROOT/lib/modules/$KVER/${rel%%.ko*}.ko
    mkdir -p "$(dirname "$dst")"
    case "$rel" in
        *.ko) cp "$KMOD/$rel" "$dst" ;;
        *.ko.xz)
            command -v xz >/dev/null || apt_install xz-utils
            xz -dc "$KMOD/$rel" >"$dst" ;;
        *.ko.zst)
            command -v zstd >/dev/null || apt_install zstd
            zstd -dcq "$KMOD/$rel" >"$dst" ;;
        *.ko.gz) gzip -dc "$KMOD/$rel" >"$dst" ;;
        *) die "unknown module format: $rel" ;;
    esac
    # .modinfo holds NUL-terminated "depends=a,b" (names use '_').
    tr '\0' '\n' <"$dst" | awk 'index($0, "depends=") == 1 && !d { d = 1; print substr($0, 9) }' \
        | tr ',' '\n'
}

LOAD=()     # top-level modules the guest modprobes
MISSING=()  # optional modules the kernel does not have
add_module() { # NAME REQUIRED(0|1) TOPLEVEL(0|1)
    local n=${1//-/_} d
    if [ -n "${PICKED[$n]:-}" ]; then
        [ "$3" = 1 ] && [ "${PICKED[$n]}" = module ] && LOAD+=("$n")
        return 0
    fi
    if [ -n "${BUILTIN[$n]:-}" ]; then
        PICKED[$n]=builtin
        return 0
    fi
    if [ -z "${MODPATH[$n]:-}" ]; then
        [ "$2" = 1 ] && die "required module $n not found in $KPKG"
        MISSING+=("$n")
        return 0
    fi
    PICKED[$n]=module
    [ "$3" = 1 ] && LOAD+=("$n")
    local deps
    deps=$(copy_module "$n") || die "copying module $n failed"
    for d in $deps; do
        add_module "$d" "$2" 0
    done
    return 0
}
for m in "${REQUIRED_MODULES[@]}"; do add_module "$m" 1 1; done
for m in "${OPTIONAL_MODULES[@]}"; do add_module "$m" 0 1; done
for m in "${ONDEMAND_MODULES[@]}"; do add_module "$m" 0 0; done
[ "${#MISSING[@]}" = 0 ] || log "optional modules not in this kernel: ${MISSING[*]}"

for f in modules.builtin modules.builtin.modinfo modules.order; do
    [ -f "$KMOD/$f" ] && cp "$KMOD/$f" "$ROOT/lib/modules/$KVER/"
done
# modules.dep/alias/symbols for busybox modprobe, made by busybox depmod.
"$BB" depmod -b "$ROOT" "$KVER" || die "depmod failed"
[ -s "$ROOT/lib/modules/$KVER/modules.dep" ] || die "depmod wrote no modules.dep"
printf '%s\n' "${LOAD[@]}" >"$ROOT/etc/uvmctl/modules"
NMOD=$(find "$ROOT/lib/modules/$KVER" -name '*.ko' | wc -l)

cat >"$ROOT/etc/uvmctl/guest-release" <<EOF
kernel_package=$KPKG
kernel_package_version=$KVERSION
kernel_release=$KVER
busybox_package_version=$BBVERSION
input_sha256=$INPUT_HASH
EOF

# ------------------------------------------------------------ initramfs
# Reproducible: fixed mtimes, sorted names, owner root.
find "$ROOT" -exec touch -h -d @0 {} +
(
    cd "$ROOT"
    find . -mindepth 1 | LC_ALL=C sort \
        | cpio --quiet -o -H newc -R 0:0 --reproducible
) | gzip -9 -n >"$WORK/initrd.img"

# ------------------------------------------------------------ vmlinux
# Uncompressed kernel for PVH boot: find the compressed payload in the
# bzImage (like the kernel's scripts/extract-vmlinux) and unpack it.
OUTPUTS=(vmlinuz initrd.img)
extract_vmlinux() { # BZIMAGE DEST
    local magic tool off
    for magic in xz gzip zstd; do
        case $magic in
        xz) tool="xz -dc --single-stream"; pat=$'\xfd7zXZ\x00' ;;
        gzip) tool="gzip -dc"; pat=$'\x1f\x8b\x08' ;;
        zstd) tool="zstd -dcq"; pat=$'\x28\xb5\x2f\xfd' ;;
        esac
        command -v "${tool%% *}" >/dev/null || continue
        for off in $(LC_ALL=C grep -abo "$pat" "$1" 2>/dev/null | head -n 5 | cut -d: -f1); do
            tail -c +"$((off + 1))" "$1" | $tool >"$2" 2>/dev/null || true
            if [ "$(head -c 4 "$2" | od -An -c | tr -d ' ')" = '177ELF' ]; then
                return 0
            fi
        done
    done
    return 1
}
if [ "${UVMCTL_GUEST_VMLINUX:-1}" = 1 ]; then
    if ! grep -q '^CONFIG_PVH=y' "$WORK/kernel/boot/config-$KVER" 2>/dev/null; then
        log "kernel has no CONFIG_PVH: not producing vmlinux"
    elif extract_vmlinux "$VMLINUZ" "$WORK/vmlinux"; then
        OUTPUTS+=(vmlinux)
    else
        log "warning: could not extract vmlinux from $VMLINUZ"
    fi
fi

# ------------------------------------------------------------ install
cp "$VMLINUZ" "$WORK/vmlinuz"
rm -f "$OUT/manifest"   # outputs are invalid until the manifest is back
for f in vmlinuz initrd.img vmlinux; do
    case " ${OUTPUTS[*]} " in
    *" $f "*)
        cp "$WORK/$f" "$OUT/.$f.tmp"
        mv -f "$OUT/.$f.tmp" "$OUT/$f"
        ;;
    *) rm -f "$OUT/$f" ;;
    esac
done
{
    echo "# uvmctl test guest, built by guest/build.sh"
    echo "kernel_package=$KPKG"
    echo "kernel_package_version=$KVERSION"
    echo "kernel_release=$KVER"
    echo "busybox_package_version=$BBVERSION"
    echo "busybox_version=$BBVERSION_RUN"
    echo "modules_loaded=${LOAD[*]}"
    echo "modules_files=$NMOD"
    echo "outputs=${OUTPUTS[*]}"
    for f in "${OUTPUTS[@]}"; do
        echo "${f}_sha256=$(sha256sum <"$OUT/$f" | cut -d' ' -f1)"
        echo "${f}_bytes=$(stat -c %s "$OUT/$f")"
        echo "${f}_stat=$(stat -c '%s %Y' "$OUT/$f")"
    done
    echo "input_sha256=$INPUT_HASH"
    echo "fast_key=$FAST_KEY"
} >"$OUT/.manifest.tmp"
mv -f "$OUT/.manifest.tmp" "$OUT/manifest"
log "done in $(( $(date +%s) - START ))s: $OUT (kernel $KVER, $NMOD modules, initrd $(stat -c %s "$OUT/initrd.img") bytes)"
