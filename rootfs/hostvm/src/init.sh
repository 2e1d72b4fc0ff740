#!/bin/busybox sh
# /init of the Roost host VM (rootfs/hostvm/src/init.sh, embedded by roost-hostvm).
#
# Mounts the basics, loads the carried modules, brings up networking, names the attached
# image disks, then runs the command prepared in /opt/roost/run with its stdout and stderr on
# their own virtio-serial ports, reports its exit status on the control port and reboots
# (QEMU runs with -no-reboot, so it exits). Control lines are documented in protocol.rs.
/bin/busybox mount -t proc proc /proc
read -r T0 _ < /proc/uptime
export PATH=/opt/roost/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root ROOST_CACHE_DIR=/opt/roost/cache

CTL=
console() { echo "roost-hostvm: $*" > /dev/console; }
fail() {
    console "FAILED at $1: $2"
    [ -n "$CTL" ] && echo "roost:fail $1 $2" >&3
    reboot -f
    sleep 5
}
stage() {
    [ -n "$CTL" ] && echo "roost:stage $1" >&3
}

mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /dev/roost
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -t cgroup2 cgroup2 /sys/fs/cgroup
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr

modprobe -a @EARLY_MODULES@ || fail modules "cannot load @EARLY_MODULES@"
# The remaining boot-time modules load while the ports come up (module loading is slow here).
modprobe -a @MODULES@ 2>/tmp/modprobe.err &
MODPROBE=$!

# Find the named virtio-serial ports; names arrive shortly after the driver binds.
OUT= ERR=
tries=0
while :; do
    for port in /sys/class/virtio-ports/*; do
        [ -r "$port/name" ] || continue
        case "$(cat "$port/name")" in
            @CONTROL_PORT@) CTL=/dev/${port##*/} ;;
            @STDOUT_PORT@) OUT=/dev/${port##*/} ;;
            @STDERR_PORT@) ERR=/dev/${port##*/} ;;
        esac
    done
    [ -n "$CTL" ] && [ -n "$OUT" ] && [ -n "$ERR" ] && [ -c "$CTL" ] && [ -c "$OUT" ] && [ -c "$ERR" ] && break
    tries=$((tries + 1))
    [ $tries -gt 1000 ] && { CTL=; fail ports "virtio-serial ports did not appear"; }
    usleep 10000
done
exec 3> "$CTL"
read -r T1 _ < /proc/uptime
echo "roost:init $T0 $T1" >&3
# Signs of life for the host, which kills a host VM that falls silent (see protocol.rs).
( while sleep @HEARTBEAT_SECS@; do echo roost:alive >&3 || exit 0; done ) &

stage modules
wait $MODPROBE || fail modules "$(tr '\n' ' ' < /tmp/modprobe.err)"

# Device nodes of modules that load on first use (as kmod's static-nodes does for udev).
mkdir -p /dev/net /dev/mapper
grep -v '^#' "/lib/modules/$(uname -r)/modules.devname" | while read -r module node kind; do
    type=${kind%%[0-9]*}
    numbers=${kind#?}
    mknod -m 0600 "/dev/$node" "$type" "${numbers%:*}" "${numbers#*:}" 2>/dev/null
done

stage kvm
[ -c /dev/kvm ] || fail kvm "/dev/kvm is missing after loading kvm_amd: is SVM exposed to the host VM (-cpu ...,+svm)?"
grep -qw svm /proc/cpuinfo || fail kvm "the host VM's CPU has no svm flag"

stage network
ip link set lo up
if [ -d /sys/class/net/eth0 ]; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 \
        || fail network "cannot configure eth0"
fi

stage disks
if [ -r /etc/roost/disks ]; then
    while read -r serial name; do
        found=
        for blk in /sys/block/vd*; do
            [ -r "$blk/serial" ] || continue
            if [ "$(cat "$blk/serial")" = "$serial" ]; then
                ln -sf "/dev/${blk##*/}" "/dev/roost/$name"
                found=1
            fi
        done
        [ -n "$found" ] || fail disks "no virtio disk with serial $serial (image $name)"
    done < /etc/roost/disks
fi

[ -r /opt/roost/run/env ] && . /opt/roost/run/env
[ -x /opt/roost/run/cmd ] || fail command "no command in /opt/roost/run/cmd"
cd /root
read -r T2 _ < /proc/uptime
echo "roost:ready $T2" >&3
/opt/roost/run/cmd < /dev/null > "$OUT" 2> "$ERR"
echo "roost:exit $?" >&3
exec 3>&-
reboot -f
sleep 5
