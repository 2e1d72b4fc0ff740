//! The jailer on a real kernel with real KVM, inside the host VM: a shell in a jail sees only
//! its own files, runs as the unprivileged uid in its own namespaces and cannot regain
//! privileges; our VMM boots the base image jailed and its agent answers through the socket in
//! the jail's directory; SIGTERM to the jailer stops the VM and removes the jail; a jailer
//! killed with SIGKILL takes its VMM with it and `roost jail clean` removes what is left, with
//! no mount visible afterwards.
//!
//! Needs qemu-system-x86, release binaries (`cargo build --release -p roost -p
//! roost-agent-client`) and the `kernel` and `rootfs-base` artefacts (`roost images build`).

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;

const SCRIPT: &str = r#"
result() { echo "RESULT $1 $2"; }
K=$(sed -n 's/.*"path": "\(.*\)".*/\1/p' $ROOST_CACHE_DIR/index/kernel.json)
R=$(sed -n 's/.*"path": "\(.*\)".*/\1/p' $ROOST_CACHE_DIR/index/rootfs-base.json)
ROOST=$(command -v roost)
# `command -v busybox` names the applet, not the file.
BB=/bin/busybox
J=/tmp/jails
JAIL="roost jail run --uid 1000 --gid 1000"

# 1. What a program inside sees and may do.
timeout 120 $JAIL --root $J/look --hostname jailed --binary $BB --device /dev/null --writable-dir /run -- \
  $BB sh -c "echo ROOT \$($BB ls -A / | $BB tr '\n' ' '); echo ID \$($BB id -u) \$($BB id -g); \
    echo HOST \$($BB hostname); echo PID \$\$; echo LINKS \$($BB ip -o link | $BB wc -l); \
    $BB mknod /run/x c 1 3 2>/dev/null && echo MKNOD yes || echo MKNOD no; \
    $BB hostname other 2>/dev/null && echo SETHOST yes || echo SETHOST no; \
    [ -e /etc/passwd ] && echo ETC yes || echo ETC no" > /tmp/look.out 2>/tmp/look.err
result look-exit $?
cat /tmp/look.out /tmp/look.err | sed 's/^/LOOK /'
result look-root "$(sed -n 's/^ROOT //p' /tmp/look.out)"
result look-id "$(sed -n 's/^ID //p' /tmp/look.out)"
result look-host "$(sed -n 's/^HOST //p' /tmp/look.out)"
result look-pid "$(sed -n 's/^PID //p' /tmp/look.out)"
result look-links "$(sed -n 's/^LINKS //p' /tmp/look.out)"
result look-mknod "$(sed -n 's/^MKNOD //p' /tmp/look.out)"
result look-sethost "$(sed -n 's/^SETHOST //p' /tmp/look.out)"
result look-etc "$(sed -n 's/^ETC //p' /tmp/look.out)"
result look-removed "$([ -e $J/look ] && echo no || echo yes)"

# Bad input is refused before anything is made.
timeout 60 roost jail run --uid 0 --gid 0 --root $J/bad --binary $BB -- $BB true 2>/tmp/bad.err
result bad-root-uid $?
result bad-root-msg "$(grep -c 'unprivileged identity' /tmp/bad.err)"
result bad-left "$([ -e $J/bad ] && echo yes || echo no)"

# 2. Our VMM, jailed. Every wait is bounded; a failed step prints what the jail holds, the
# jailer's and VMM's output and the guest console's tail.
vmm_pid() { # the pid (host view) of the VMM jailed under $1
  for d in /proc/[0-9]*; do
    case "$(tr '\0' ' ' < $d/cmdline 2>/dev/null)" in
      *"roost vm run"*"--serial-log /run/serial.log"*)
        [ -e "$d/root/run/serial.log" ] && [ "$(stat -c %i $d/root/run)" = "$(stat -c %i $1/run)" ] && echo ${d#/proc/};;
    esac
  done
}
diag() { # NAME: what a failed step leaves to look at
  echo "DIAG $1: jailer $(cat /proc/$2/stat 2>/dev/null | cut -d' ' -f1-3)"
  ls -laR $J/$1 2>&1 | head -40 | sed "s/^/DIAG $1 ls: /"
  sed "s/^/DIAG $1 out: /" /tmp/$1.out
  tail -30 /tmp/$1.err | sed "s/^/DIAG $1 err: /"
  tail -30 $J/$1/run/serial.log 2>&1 | sed "s/^/DIAG $1 serial: /"
}
boot_jailed() { # NAME
  $JAIL --root $J/$1 --hostname vmm-$1 --binary $ROOST --mount $K:/kernel --mount $R:/rootfs \
    --device /dev/kvm --device /dev/urandom --writable-dir /run -- \
    $ROOST vm run --kernel /kernel --rootfs /rootfs --rootfs-ro --vsock-uds /run/v.sock \
    --serial-log /run/serial.log > /tmp/$1.out 2>/tmp/$1.err &
}
running() { # PID: the background job has not ended (a zombie has ended)
  s=$(cut -d' ' -f3 /proc/$1/stat 2>/dev/null); [ -n "$s" ] && [ "$s" != Z ]
}
wait_agent() { # NAME PID: until the agent answers through the jail's socket (at most 240 s)
  end=$(( $(date +%s) + 240 ))
  until timeout 10 roost-agent-ctl --vsock-uds $J/$1/run/v.sock health > /dev/null 2>&1; do
    running $2 || { echo "DIAG $1: the jailer ended before the agent answered"; diag $1 $2; return 2; }
    [ $(date +%s) -lt $end ] || { echo "DIAG $1: no agent within 240 s"; diag $1 $2; return 1; }
    usleep 500000
  done
}
stop_job() { # PID SIGNAL SECONDS: signal a background job, wait for it (SIGKILL after SECONDS)
  kill -$2 $1 2>/dev/null
  end=$(( $(date +%s) + $3 ))
  while running $1 && [ $(date +%s) -lt $end ]; do usleep 200000; done
  running $1 && { echo "DIAG job $1 still running $3 s after SIG$2; killing it"; kill -9 $1; }
  wait $1
}
boot_jailed vm1
JP=$!
wait_agent vm1 $JP; result vm-ready $?
result vm-exec "$(timeout 60 roost-agent-ctl --vsock-uds $J/vm1/run/v.sock exec -- echo jailed-hello)"
P=$(vmm_pid $J/vm1)
result vm-found "$([ -n "$P" ] && echo yes || echo no)"
[ -n "$P" ] || { ps -o pid,user,args 2>/dev/null | sed 's/^/DIAG ps: /'; P=none; }
result vm-uid "$(awk '/^Uid:/ {print $2}' /proc/$P/status)"
result vm-capeff "$(awk '/^CapEff:/ {print $2}' /proc/$P/status)"
result vm-nspid "$(awk '/^NSpid:/ {print $NF}' /proc/$P/status)"
for ns in mnt pid ipc uts net; do
  result vm-ns-$ns "$([ "$(readlink /proc/$P/ns/$ns)" != "$(readlink /proc/self/ns/$ns)" ] && echo own || echo shared)"
done
result vm-root "$(ls -A /proc/$P/root/ | tr '\n' ' ')"
result vm-host-file "$([ -e /etc/roost/disks ] && [ ! -e /proc/$P/root/etc/roost/disks ] && echo hidden || echo visible)"
stop_job $JP TERM 60; result vm-term-exit $?
result vm-removed "$([ -e $J/vm1 ] && echo no || echo yes)"
tail -3 /tmp/vm1.err | sed 's/^/VM1 /'

# 3. A jailer killed with SIGKILL: its VMM dies with it; clean removes the directory.
boot_jailed vm2
JP=$!
wait_agent vm2 $JP; result vm2-ready $?
P=$(vmm_pid $J/vm2)
stop_job $JP 9 30
i=0; while [ -n "$P" ] && [ -e /proc/$P ] && [ $i -lt 100 ]; do usleep 100000; i=$((i+1)); done
result vm2-vmm-gone "$([ -n "$P" ] && [ ! -e /proc/$P ] && echo yes || echo no)"
result vm2-left-before-clean "$([ -e $J/vm2 ] && echo yes || echo no)"
timeout 60 roost jail clean --base $J > /dev/null; result clean-exit $?
result jails-left "$(ls -A $J | wc -l)"
result mounts-left "$(grep -c " $J" /proc/self/mountinfo)"

# 4. A jailed VMM on the sandbox's network: `roost net run` makes the namespace and its tap,
# the jail joins that namespace and the jailer hands the VMM the tap as fd 3 (the jailed uid
# could not attach to it itself; /dev/net/tun is not inside). The guest's DNS query for a
# denied name reaches the namespace's forwarder through it and is refused there.
for m in tun veth nf_tables nft_ct nft_nat nft_chain_nat nft_masq nft_reject nft_reject_ipv4; do
  modprobe $m 2>/dev/null
done
cat > /tmp/netjail.sh <<'JAILEOF'
for f in /var/run/netns/roost-*; do
  [ "$(stat -L -c %i $f)" = "$(stat -L -c %i /proc/self/ns/net)" ] && NETNS=$f
done
echo "NETNS $NETNS"
exec roost jail run --uid 1000 --gid 1000 --root $J/vm3 --hostname vmm-vm3 --netns $NETNS \
  --tap $ROOST_VM_NET_TAP --binary $ROOST --mount $K:/kernel --mount $R:/rootfs \
  --device /dev/kvm --device /dev/urandom --writable-dir /run -- \
  $ROOST vm run --kernel /kernel --rootfs /rootfs --rootfs-ro --vsock-uds /run/v.sock \
  --serial-log /run/serial.log --net-tap-fd 3 --net-mac $ROOST_VM_NET_MAC
JAILEOF
J=$J K=$K R=$R ROOST=$ROOST roost net run --deny-out denied.test --upstream-dns 127.0.0.1:53 -- \
  sh /tmp/netjail.sh > /tmp/vm3.out 2>/tmp/vm3.err &
NP=$!
wait_agent vm3 $NP; result vm3-ready $?
DNSQ='import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.sendto(bytes.fromhex("1234010000010000000000000664656e69656404746573740000010001"), ("169.254.0.1", 53))
print("rcode", s.recv(512)[3] & 15)'
result vm3-dns "$(timeout 60 roost-agent-ctl --vsock-uds $J/vm3/run/v.sock exec -- python3 -c "$DNSQ" 2>&1)"
NETNS=$(sed -n 's/^NETNS //p' /tmp/vm3.out)
P=$(vmm_pid $J/vm3)
[ -n "$P" ] || P=none
result vm3-uid "$(awk '/^Uid:/ {print $2}' /proc/$P/status)"
result vm3-netns "$([ -n "$NETNS" ] && [ "$(readlink /proc/$P/ns/net)" = "net:[$(stat -L -c %i $NETNS)]" ] && echo sandbox || echo other)"
result vm3-tun "$([ -e /proc/$P/root/dev/net/tun ] && echo present || echo absent)"
stop_job $NP TERM 90; result vm3-exit $?
result vm3-removed "$([ -e $J/vm3 ] && echo no || echo yes)"
result vm3-net-left "$(timeout 60 roost net list | wc -l)"
tail -5 /tmp/vm3.err | sed 's/^/VM3 /'
"#;

#[test]
fn jailer_in_host_vm() {
    let run = ScriptRun::run(
        HostVm::builder().timeout(roost_hostvm::script::TEST_LIMIT),
        SCRIPT,
        &["kernel", "rootfs-base"],
    )
    .expect("host VM run");
    let all = run.transcript();
    let get = |key: &str| run.expect_result(key);

    assert_eq!(get("look-exit"), "0", "{all}");
    let root: Vec<&str> = get("look-root").split_whitespace().collect();
    let mut sorted = root.clone();
    sorted.sort();
    assert!(
        sorted
            .iter()
            .all(|e| ["bin", "dev", "lib", "lib64", "run", "usr"].contains(e)),
        "only the binary's directories, /dev and /run are inside: {root:?}; {all}"
    );
    assert_eq!(get("look-id"), "1000 1000", "{all}");
    assert_eq!(get("look-host"), "jailed", "{all}");
    assert_eq!(
        get("look-pid"),
        "1",
        "PID 1 of its own PID namespace; {all}"
    );
    assert_eq!(
        get("look-links"),
        "1",
        "a new network namespace: loopback only; {all}"
    );
    assert_eq!(get("look-mknod"), "no", "{all}");
    assert_eq!(get("look-sethost"), "no", "{all}");
    assert_eq!(get("look-etc"), "no", "host files are not visible; {all}");
    assert_eq!(get("look-removed"), "yes", "{all}");

    assert_eq!(get("bad-root-uid"), "1", "{all}");
    assert_eq!(get("bad-root-msg"), "1", "{all}");
    assert_eq!(get("bad-left"), "no", "{all}");

    assert_eq!(get("vm-ready"), "0", "{all}");
    assert_eq!(get("vm-exec"), "jailed-hello", "{all}");
    assert_eq!(get("vm-found"), "yes", "{all}");
    assert_eq!(get("vm-uid"), "1000", "{all}");
    assert_eq!(get("vm-capeff"), "0000000000000000", "{all}");
    assert_eq!(get("vm-nspid"), "1", "{all}");
    for ns in ["mnt", "pid", "ipc", "uts", "net"] {
        assert_eq!(get(&format!("vm-ns-{ns}")), "own", "{ns}; {all}");
    }
    let vm_root: Vec<&str> = get("vm-root").split_whitespace().collect();
    assert!(
        vm_root.contains(&"kernel") && vm_root.contains(&"rootfs"),
        "{all}"
    );
    // The binary lives in /opt/roost/bin inside the host VM: its directories, its libraries',
    // the kernel, the disk, /dev and /run, nothing else.
    assert!(
        vm_root.iter().all(|e| [
            "dev", "kernel", "lib", "lib64", "opt", "rootfs", "run", "usr"
        ]
        .contains(e)),
        "only what the VMM needs is inside: {vm_root:?}; {all}"
    );
    assert_eq!(
        get("vm-host-file"),
        "hidden",
        "a host file is not visible to the VMM; {all}"
    );
    assert_eq!(
        get("vm-term-exit"),
        "5",
        "the VMM's 'stopped by a signal'; {all}"
    );
    assert_eq!(get("vm-removed"), "yes", "{all}");

    assert_eq!(get("vm2-ready"), "0", "{all}");
    assert_eq!(
        get("vm2-vmm-gone"),
        "yes",
        "the VMM dies with its jailer; {all}"
    );
    assert_eq!(get("vm2-left-before-clean"), "yes", "{all}");
    assert_eq!(get("clean-exit"), "0", "{all}");
    assert_eq!(get("jails-left"), "0", "{all}");
    assert_eq!(get("mounts-left"), "0", "{all}");

    assert_eq!(get("vm3-ready"), "0", "{all}");
    assert_eq!(
        get("vm3-dns"),
        "rcode 5",
        "the guest's query crossed the tap and was refused by the forwarder; {all}"
    );
    assert_eq!(get("vm3-uid"), "1000", "{all}");
    assert_eq!(
        get("vm3-netns"),
        "sandbox",
        "the jailed VMM is in the sandbox's namespace; {all}"
    );
    assert_eq!(get("vm3-tun"), "absent", "{all}");
    assert_eq!(get("vm3-exit"), "5", "SIGTERM reached the VMM; {all}");
    assert_eq!(get("vm3-removed"), "yes", "{all}");
    assert_eq!(get("vm3-net-left"), "0", "{all}");
}
