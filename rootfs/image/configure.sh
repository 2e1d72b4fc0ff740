#!/bin/sh
# Turns a debootstrapped Debian tree into a Roost guest root filesystem. Run by the image
# builder (rootfs/builder/src/rootfs/) as root on the build host, after roost-agent has been
# installed as /usr/sbin/roost-agent and before the tree is packed with `mkfs.ext4 -d`.
#
# Usage: configure.sh ROOT IMAGE_NAME
# Environment: SOURCE_DATE_EPOCH (required): every timestamp newer than it is clamped to it.
#
# Editing this file changes the cache key of every image (not of the debootstrapped trees).
set -eu
root=$1
image=$2
: "${SOURCE_DATE_EPOCH:?SOURCE_DATE_EPOCH must be set}"
export LC_ALL=C
in_root() { chroot "$root" "$@"; }

# --- PID 1: roost-agent ------------------------------------------------------------------
test -x "$root/usr/sbin/roost-agent"
ln -sfn roost-agent "$root/usr/sbin/init"
# `poweroff`, `halt` and `reboot` ask PID 1 to shut down (a guest reset ends the microVM).
for name in poweroff halt reboot; do ln -sfn roost-agent "$root/usr/sbin/$name"; done

# --- Identity -----------------------------------------------------------------------------
# debootstrap copies the build host's hostname, hosts and resolv.conf: replace all three.
# The running hostname comes from `roost.hostname=` on the kernel command line (else this
# file) and resolves through nss-myhostname, so /etc/hosts can stay generic on a read-only root.
echo roost >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	roost
::1		localhost ip6-localhost ip6-loopback
ff02::1		ip6-allnodes
ff02::2		ip6-allrouters
HOSTS
: >"$root/etc/resolv.conf"
grep -q '^hosts:.*myhostname' "$root/etc/nsswitch.conf" ||
    sed -i 's/^hosts:.*/hosts:          files myhostname dns/' "$root/etc/nsswitch.conf"
: >"$root/etc/machine-id"
cat >"$root/etc/fstab" <<'FSTAB'
# Unused: roost-agent (PID 1) mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /tmp, /run and
# /sys/fs/cgroup itself; the root filesystem is given on the kernel command line.
FSTAB

# --- The sandbox user ---------------------------------------------------------------------
# uid/gid 1000, home /home/user, bash, no password (locked), passwordless sudo.
in_root groupadd --gid 1000 user
in_root useradd --uid 1000 --gid 1000 --create-home --home-dir /home/user \
    --shell /bin/bash --comment 'Roost sandbox user' user
echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/roost-user"
chmod 0440 "$root/etc/sudoers.d/roost-user"
in_root visudo --check --quiet
test "$(in_root id -u user):$(in_root id -g user)" = 1000:1000

# --- Python -------------------------------------------------------------------------------
# A sandbox is disposable: let `pip install` work without --break-system-packages (PEP 668).
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED

# --- Size ---------------------------------------------------------------------------------
# No documentation besides copyright notices, now and for packages installed later.
cat >"$root/etc/dpkg/dpkg.cfg.d/roost-nodoc" <<'DPKG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
DPKG
find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root/usr/share/man" "$root/usr/share/info"
# apt indexes and caches (`apt-get update` brings the lists back when needed).
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin \
    "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/archives/partial/*
mkdir -p "$root/var/lib/apt/lists/partial"
# Build-time leftovers that differ from build to build.
rm -f "$root"/var/log/*.log "$root"/var/log/apt/* "$root/var/cache/ldconfig/aux-cache" \
    "$root"/var/lib/dpkg/*-old "$root"/etc/*- "$root"/etc/ssh/ssh_host_*
rm -rf "$root"/tmp/* "$root"/var/tmp/* "$root"/root/.cache "$root"/debootstrap
echo "$image" >"$root/etc/roost-image"

# --- Reproducibility ----------------------------------------------------------------------
find "$root" -xdev -newermt "@$SOURCE_DATE_EPOCH" -print0 |
    xargs -0r touch --no-dereference --date="@$SOURCE_DATE_EPOCH"
