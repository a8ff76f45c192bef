#!/bin/sh
# Bulkhead micro-VM init: PID 1 of the guest, run from the project's busybox initramfs.
#
# Stage "init" (PID 1, initramfs root): load modules, mount the image's read-only root disk (/dev/vda,
# EROFS or ext4) under an overlay whose upper dir lives on the VM's writable disk (/dev/vdb, ext4),
# configure the network from our bulkhead.* kernel parameters, start the workload, report its exit
# code on the console, export the upper dir as a tar stream onto the export disk, unmount cleanly
# and power off.
# Stage "launch" (the workload's process, already chrooted and with its uid/gid by nsenter): change
# to the workload's directory, replace the environment and exec the workload's args.
#
# The workload's args/env/cwd/user never travel on the kernel command line: the host builds a small
# read-only spec disk (serial bulkhead-spec), a tar of NUL-terminated files that we unpack into
# /run/spec (outside the workload's root), and they are only ever read with `read -d ''` into quoted
# variables, never evaluated. The host never mounts the writable disk: what it gets of our changes is
# the tar stream we write onto the export disk (serial bulkhead-export) at a clean stop.

set -f  # no pathname expansion anywhere: every word here is literal

# Everything here runs busybox applets; the image's own programs run only as the workload.
export PATH=/bin
SPEC_DIR=/run/spec
DEFAULT_LOOKUP_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin

log() {
    echo "bulkhead-init: $*" >&2
}

# ---------------------------------------------------------------- stage "launch" (workload side)
# fd 6: args, fd 7: env, fd 9: cwd, each a NUL-terminated list read from the writable disk.
launch() {
    cwd=/
    IFS= read -r -d '' cwd <&9 || true
    cd -- "$cwd" || { log "cannot change to the working directory"; exit 126; }
    # Our shell exports these by itself; the workload gets exactly the env of its spec.
    lookup_path=$DEFAULT_LOOKUP_PATH
    unset SHLVL PWD OLDPWD PATH HOME
    home_given=
    while IFS= read -r -d '' entry <&7; do
        case "$entry" in
            PATH=*) lookup_path=${entry#PATH=} ;;
            HOME=*) home_given=1 ;;
        esac
        export -- "$entry"
    done
    # Like runc: without HOME in the env, use the user's home from the image's /etc/passwd, else /.
    if [ -z "$home_given" ]; then
        home=/
        if [ -r /etc/passwd ]; then
            while IFS=: read -r _name _password entry_uid _gid _gecos entry_home _shell; do
                if [ "$entry_uid" = "$1" ]; then
                    home=${entry_home:-/}
                    break
                fi
            done </etc/passwd
        fi
        export HOME="$home"
    fi
    set --
    while IFS= read -r -d '' arg <&6; do
        set -- "$@" "$arg"
    done
    [ "$#" -gt 0 ] || { log "no args to run"; exit 127; }
    program=$1
    # Resolve the program on the workload's PATH ourselves, like runc does: our shell would
    # otherwise prefer its own busybox applet of the same name over the image's program.
    case "$program" in
        */*) resolved=$program ;;
        *)
            resolved=
            rest=$lookup_path:
            while [ -n "$rest" ]; do
                dir=${rest%%:*}
                rest=${rest#*:}
                [ -n "$dir" ] || dir=.
                if [ -f "$dir/$program" ] && [ -x "$dir/$program" ]; then
                    resolved=$dir/$program
                    break
                fi
            done
            [ -n "$resolved" ] || { log "executable file not found in \$PATH"; exit 127; }
            ;;
    esac
    shift
    exec -a "$program" "$resolved" "$@" 6<&- 7<&- 8<&- 9<&-
}

if [ "${1:-}" = "launch" ]; then
    launch "$2"
    exit 127
fi

# ---------------------------------------------------------------- stage "init" (PID 1)
# The host measures boot time up to this line and uses it to tell init output from kernel output.
echo "BULKHEAD-INIT"

fail() {
    log "$*"
    echo "BULKHEAD-FAIL"
    sync
    poweroff -f
}

# Overlay marks a directory that hides the lower layers' content (deleted, then made again) with an
# xattr, which busybox tar does not carry. Find them without reading xattrs: mount the upper dir as the
# top lower layer over a probe tree holding a file in each of its directories; an opaque directory
# hides its probe. Each gets the OCI marker file .wh..wh..opq for the time of the export ($1 lists
# them, NUL-separated). A directory under an opaque one is marked too, which changes nothing.
mark_opaque_dirs() {
    mkdir -p /run/probe /run/probed
    (cd /mnt/rw/upper && find . -type d -print0) >/run/upper-dirs || return 1
    while IFS= read -r -d '' dir; do
        mkdir -p "/run/probe/$dir" && : >"/run/probe/$dir/.bulkhead-probe" || return 1
    done </run/upper-dirs
    mount -t overlay -o lowerdir=/mnt/rw/upper:/run/probe overlay /run/probed || return 1
    while IFS= read -r -d '' dir; do
        [ -e "/run/probed/$dir/.bulkhead-probe" ] && continue
        printf '%s\0' "$dir" >>"$1"
        : >"/mnt/rw/upper/$dir/.wh..wh..opq"
    done </run/upper-dirs
    umount /run/probed
}

# The captured changes leave the VM only as this stream: the upper dir as a tar (whiteouts are 0/0
# devices, as overlay has them) from the start of the export disk, and in its last sector the header
# "BULKHEAD-EXPORT 1 <nonce> <ok|failed> <length>". The host takes the stream in like any untrusted
# image layer; a VM that never gets here (killed, crashed) has no header and so no changes to show.
export_changes() {
    status=failed
    length=0
    opaque_dirs=/run/opaque-dirs
    : >"$opaque_dirs"
    if grep -q ' /mnt/rw ' /proc/mounts && [ -d /mnt/rw/upper ] && [ ! -L /mnt/rw/upper ] \
        && mark_opaque_dirs "$opaque_dirs"; then
        if length=$(set -o pipefail; tar -c -C /mnt/rw/upper . | tee "$export_dev" | wc -c); then
            status=ok
        fi
    fi
    while IFS= read -r -d '' dir; do
        rm -f "/mnt/rw/upper/$dir/.wh..wh..opq"
    done <"$opaque_dirs"
    sectors=$(cat "/sys/block/${export_dev#/dev/}/size")
    printf 'BULKHEAD-EXPORT 1 %s %s %s\n' "$nonce" "$status" "${length:-0}" \
        | dd of="$export_dev" bs=512 seek=$((sectors - 1)) count=1 conv=sync 2>/dev/null
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# Modules in dependency order (the list is generated at build time from the modules' depends=).
while read -r module; do
    insmod "/lib/modules/$module.ko" 2>/dev/null || log "insmod $module failed"
done </lib/modules/load-order

# Kernel parameters we understand; all values are generated by the server.
net_address= net_gateway= net_dns= net_hostname= net_mac=
for param in $(cat /proc/cmdline); do
    case "$param" in
        bulkhead.ip=*) net_address=${param#*=} ;;
        bulkhead.gw=*) net_gateway=${param#*=} ;;
        bulkhead.dns=*) net_dns=${param#*=} ;;
        bulkhead.hostname=*) net_hostname=${param#*=} ;;
        bulkhead.mac=*) net_mac=${param#*=} ;;
    esac
done

# The virtio disk whose serial is $1 (the host names its spec and export disks so).
disk_with_serial() {
    for name in vda vdb vdc vdd vde vdf; do
        if [ "$(cat "/sys/block/$name/serial" 2>/dev/null)" = "$1" ] && [ -b "/dev/$name" ]; then
            echo "/dev/$name"
            return 0
        fi
    done
    return 1
}

# Device probing finishes asynchronously after insmod; wait for the disks with a deadline.
tries=0
spec_dev= export_dev=
while [ ! -b /dev/vda ] || [ ! -b /dev/vdb ] || [ -z "$spec_dev" ] || [ -z "$export_dev" ]; do
    tries=$((tries + 1))
    [ "$tries" -lt 500 ] || fail "the root, writable, spec and export disks did not appear"
    [ -n "$spec_dev" ] || spec_dev=$(disk_with_serial bulkhead-spec)
    [ -n "$export_dev" ] || export_dev=$(disk_with_serial bulkhead-export)
    [ -n "$spec_dev" ] && [ -n "$export_dev" ] && [ -b /dev/vda ] && [ -b /dev/vdb ] && break
    usleep 10000
done
mkdir -p "$SPEC_DIR"
tar -x -f "$spec_dev" -C "$SPEC_DIR" || fail "cannot read the workload spec disk"

mount -t erofs -o ro /dev/vda /mnt/ro 2>/dev/null \
    || mount -t ext4 -o ro,noload /dev/vda /mnt/ro \
    || fail "cannot mount the root disk (neither erofs nor ext4)"
mount -t ext4 /dev/vdb /mnt/rw || fail "cannot mount the writable disk"
mkdir -p /mnt/rw/upper /mnt/rw/work
# /skel is the lowest layer: it provides the mount points (proc, sys, dev, ...) that an image may lack,
# so that mounting them creates nothing in the upper dir. Features that change the upper dir's
# format (redirects, index, metacopy) are off: the upper dir must read like a container's.
mount -t overlay overlay \
    -o lowerdir=/mnt/ro:/skel,upperdir=/mnt/rw/upper,workdir=/mnt/rw/work,redirect_dir=off,index=off,metacopy=off \
    /newroot || fail "cannot mount the overlay root"
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
mount -t devtmpfs devtmpfs /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm

# Volumes (issue 17): each a virtiofs tag the host serves from the volume's directory, mounted where the
# workload wants it. The list is NUL-separated (tag, path, ro|rw) from the spec disk, never evaluated.
volume_points=
if [ -s "$SPEC_DIR/volumes" ]; then
    while IFS= read -r -d '' tag && IFS= read -r -d '' vpath && IFS= read -r -d '' vmode; do
        case "$tag" in bhvol[0-9] | bhvol[0-9][0-9]) ;; *) fail "bad volume tag in spec" ;; esac
        case "$vpath" in /*) ;; *) fail "bad volume path in spec" ;; esac
        options=rw
        [ "$vmode" = ro ] && options=ro
        mkdir -p "/newroot$vpath" || fail "cannot make the mount point of a volume"
        mount -t virtiofs -o "$options,nosuid,nodev" "$tag" "/newroot$vpath" || fail "cannot mount a volume"
        volume_points="/newroot$vpath $volume_points"
    done <"$SPEC_DIR/volumes"
fi

ip link set lo up
if [ -n "$net_address" ]; then
    if [ -n "$net_mac" ]; then
        for dev in /sys/class/net/*; do
            [ "$(cat "$dev/address" 2>/dev/null)" = "$net_mac" ] || continue
            name=${dev##*/}
            [ "$name" = eth0 ] || ip link set "$name" name eth0
        done
    fi
    ip addr add "$net_address" dev eth0 || log "cannot set address"
    ip link set eth0 up
    [ -z "$net_gateway" ] || ip route add default via "$net_gateway" || log "cannot set gateway"
fi
if [ -n "$net_dns" ]; then
    echo "nameserver $net_dns" >/run/resolv.conf
    mount --bind /run/resolv.conf /newroot/etc/resolv.conf 2>/dev/null || log "no /etc/resolv.conf"
fi
[ -z "$net_hostname" ] || hostname "$net_hostname"

# The host requests a graceful stop with the ACPI power button: acpid runs /etc/acpi/PWRF/00000080,
# which sends TERM to us, and we pass it on to the workload.
acpid -c /etc/acpi -l /dev/null -p /run/acpid.pid 2>/dev/null || log "acpid did not start"
workload_pid=
stop_requested=
trap 'stop_requested=1; [ -z "$workload_pid" ] || kill -TERM "$workload_pid" 2>/dev/null' TERM

user=$(cat "$SPEC_DIR/user" 2>/dev/null) || fail "no workload spec on the spec disk"
nonce=$(cat "$SPEC_DIR/nonce")
uid=${user%%:*}
gid=${user#*:}
case "$uid$gid" in
    "" | *[!0-9]*) fail "bad user in spec" ;;
esac

interactive=$(cat "$SPEC_DIR/tty" 2>/dev/null)

echo "BULKHEAD-START $nonce"
# nsenter chroots into the overlay, drops to the workload's uid/gid (no supplementary groups, like a
# container with none) and runs our shell's "launch" stage from this very file (fd 8).
if [ "$interactive" = 1 ]; then
    # Interactive: the console is the workload's terminal (stdin, stdout and stderr).
    env -i nsenter -F -r/newroot -w/newroot -S "$uid" -G "$gid" sh /proc/self/fd/8 launch "$uid" \
        </dev/console >/dev/console 2>&1 8</init 6<"$SPEC_DIR/args" 7<"$SPEC_DIR/env" 9<"$SPEC_DIR/cwd" &
    workload_pid=$!
    copier_pid=
else
    # Like a container's: stdin is /dev/null and stdout+stderr a pipe (not a tty, so that programs
    # print exactly what they print in a container); a copier forwards the pipe to the console.
    mkfifo /run/output
    cat /run/output >/dev/console &
    copier_pid=$!
    # A session of its own: what the workload leaves behind can go with it (see below).
    setsid env -i nsenter -F -r/newroot -w/newroot -S "$uid" -G "$gid" sh /proc/self/fd/8 launch "$uid" \
        </dev/null >/run/output 2>&1 8</init 6<"$SPEC_DIR/args" 7<"$SPEC_DIR/env" 9<"$SPEC_DIR/cwd" &
    workload_pid=$!
fi
[ -z "$stop_requested" ] || kill -TERM "$workload_pid" 2>/dev/null
wait "$workload_pid"
code=$?
# A trap interrupts `wait`; keep waiting until the workload is really gone.
while kill -0 "$workload_pid" 2>/dev/null; do
    wait "$workload_pid"
    code=$?
done
# An interrupted `wait` says 128+TERM even when the workload then exits by itself (a TERM handler
# that ends with `exit 0`): its own status is there for one more `wait` (busybox keeps it).
if [ "$code" -gt 128 ]; then
    wait "$workload_pid"
    code=$?
fi
# As in a container whose first process exited, its leftover processes go too: they would hold the
# output pipe open and keep the copier (and the stop) waiting out its bound below.
[ -z "$copier_pid" ] || kill -KILL "-$workload_pid" 2>/dev/null
# Let the copier drain what the workload wrote (bounded: a leftover child may hold the pipe open).
# A finished copier is a zombie until reaped, still "there" for kill -0: its fds tell it apart.
tries=0
while [ -n "$copier_pid" ] && [ -e "/proc/$copier_pid/fd/1" ] && [ "$tries" -lt 100 ]; do
    tries=$((tries + 1))
    usleep 10000
done
printf '\nBULKHEAD-EXIT %s %s\n' "$nonce" "$code"

# Leave the writable disk clean: stop everything, export the changes, unmount, then power off.
trap '' TERM
kill -TERM -1 2>/dev/null
usleep 50000
kill -KILL -1 2>/dev/null
# Killed processes release their files asynchronously: retry until the workload's root is unmounted.
tries=0
while grep -q ' /newroot ' /proc/mounts && [ "$tries" -lt 50 ]; do
    tries=$((tries + 1))
    for target in $volume_points /newroot/dev/shm /newroot/dev/pts /newroot/dev /newroot/sys /newroot/proc \
        /newroot/etc/resolv.conf /newroot; do
        umount "$target" 2>/dev/null
    done
    grep -q ' /newroot ' /proc/mounts && usleep 20000
done
# Mounts the workload made itself keep /newroot busy: detach the tree (no process is left to use it).
grep -q ' /newroot ' /proc/mounts && umount -l /newroot 2>/dev/null
export_changes
tries=0
while grep -q ' /mnt/rw ' /proc/mounts && [ "$tries" -lt 50 ]; do
    tries=$((tries + 1))
    umount /mnt/rw 2>/dev/null
    grep -q ' /mnt/rw ' /proc/mounts && usleep 20000
done
# Last resort: at least leave the filesystem consistent on disk.
grep -q ' /mnt/rw ' /proc/mounts && mount -o remount,ro /mnt/rw 2>/dev/null
sync
poweroff -f
