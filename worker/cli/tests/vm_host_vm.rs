//! `roost vm run` on real KVM, inside the host VM (QEMU TCG with emulated SVM). One host VM
//! boot runs several microVM checks, since each host VM costs tens of seconds:
//! boot to roost-agent's ready line and a clean shutdown (2 vCPUs, vsock, read-only root);
//! the VMM's privileges while the guest runs (no capabilities, no_new_privs, seccomp on the
//! vCPU and device threads) and a clean stop on SIGTERM; a guest kernel panic reported as exit
//! 3; a non-ELF kernel refused; 16 vCPUs with 8 GiB (RAM above the 4 GiB gap); four VMs at once.
//!
//! Needs qemu-system-x86 and the `kernel` and `rootfs-base` artefacts (`roost images build`);
//! without them the test fails with a message.

use std::time::Duration;

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;

/// Each `roost vm run` is bounded (busybox `timeout`), so a hang shows up as status 143; the
/// host VM as a whole gets 540 s, under the CI runner's 600 s limit, so a stall fails here
/// with a message.
const SCRIPT: &str = r#"
T="timeout 180"
result() { echo "RESULT $1 $2"; }

# 1. Boot to the ready line and shut down cleanly.
$T roost vm run --cpus 2 --mem 256 --rootfs-ro --vsock-uds /tmp/boot.sock \
    --serial-log /tmp/boot.log --append roost.poweroff_after_ready 2>/tmp/boot.err
result boot $?
result boot-ready "$(grep -c '^roost-agent: ready' /tmp/boot.log)"
if [ -e /tmp/boot.sock ]; then result boot-socket-left 1; else result boot-socket-left 0; fi

# 2. Privileges of a running VMM.
roost vm run --rootfs-ro --serial-log /tmp/priv.log --vsock-uds /tmp/priv.sock 2>/tmp/priv.err &
P=$!
i=0
until grep -q '^roost-agent: ready' /tmp/priv.log 2>/dev/null; do
  i=$((i+1)); [ $i -lt 1200 ] || break
  kill -0 $P 2>/dev/null || break
  usleep 100000
done
result priv-ready "$(grep -c '^roost-agent: ready' /tmp/priv.log)"
result priv-capeff "$(awk '/^CapEff:/ {print $2}' /proc/$P/status)"
result priv-capprm "$(awk '/^CapPrm:/ {print $2}' /proc/$P/status)"
result priv-nnp "$(awk '/^NoNewPrivs:/ {print $2}' /proc/$P/status)"
for t in /proc/$P/task/*; do
  echo "THREAD $(cat $t/comm) seccomp=$(awk '/^Seccomp:/ {print $2}' $t/status)"
done
kill $P
n=0; while kill -0 $P 2>/dev/null && [ $n -lt 300 ]; do n=$((n+1)); usleep 100000; done
if kill -0 $P 2>/dev/null; then kill -9 $P; wait $P; result priv-killed hung; else wait $P; result priv-killed $?; fi
if [ -e /tmp/priv.sock ]; then result priv-socket-left 1; else result priv-socket-left 0; fi

# 3. A guest kernel panic.
$T roost vm run --rootfs-ro --serial-log /tmp/panic.log \
    --cmdline 'console=ttyS0 reboot=t panic=-1 root=/dev/nonexistent ro quiet' 2>/tmp/panic.err
result panic $?

# 4. A kernel that is not an ELF vmlinux.
echo 'not a kernel' > /tmp/junk
$T roost vm run --kernel /tmp/junk --rootfs-ro 2>/tmp/junk.err
result junk-kernel $?

# 5. The largest vCPU count, and memory above the 4 GiB gap (not quiet: the kernel reports CPUs).
$T roost vm run --cpus 16 --mem 8192 --rootfs-ro --serial-log /tmp/big.log \
    --cmdline 'console=ttyS0 reboot=t panic=-1 root=/dev/vda ro rootfstype=ext4 roost.poweroff_after_ready' \
    2>/tmp/big.err
result big $?
result big-cpus "$(grep -c 'smp: Brought up 1 node, 16 CPUs' /tmp/big.log)"
result big-high-ram "$(grep -c 'BIOS-e820: \[mem 0x0000000100000000-0x000000022fffffff\] usable' /tmp/big.log)"
result big-ready "$(grep -c 'roost-agent: ready' /tmp/big.log)"

# 6. Four VMs at once.
for n in 1 2 3 4; do
  $T roost vm run --rootfs-ro --vsock-uds /tmp/m$n.sock --serial-log /tmp/m$n.log \
      --append roost.poweroff_after_ready 2>/tmp/m$n.err &
  echo $! > /tmp/m$n.pid
done
for n in 1 2 3 4; do
  wait "$(cat /tmp/m$n.pid)"
  result multi$n $?
  result multi$n-ready "$(grep -c '^roost-agent: ready' /tmp/m$n.log)"
done

for f in /tmp/*.err; do sed "s|^|STDERR $(basename $f .err): |" "$f"; done
for f in /tmp/boot.log /tmp/panic.log /tmp/m?.log; do sed "s|^|LOG $(basename $f .log): |" "$f"; done
# The big VM's log is long (16 CPUs coming up): its agent lines and its last lines only.
{ grep -a 'roost-agent' /tmp/big.log; tail -n 15 /tmp/big.log; } | sed 's|^|LOG big: |'
"#;

#[test]
fn vm_run_in_host_vm_boots_panics_and_runs_four_at_once() {
    let run = ScriptRun::run(
        HostVm::builder()
            .timeout(Duration::from_secs(540))
            .mem_mib(4096),
        SCRIPT,
        &["kernel", "rootfs-base"],
    )
    .unwrap_or_else(|e| panic!("host VM run: {e:#?}"));
    let stdout = &run.stdout;
    let all = run.transcript();
    let get = |key: &str| run.expect_result(key);
    let stderr_of = |name: &str| run.lines_after(&format!("STDERR {name}: "));

    assert_eq!(get("boot"), "0", "boot to ready and shut down; {all}");
    assert_eq!(get("boot-ready"), "1", "one ready line; {all}");
    assert_eq!(
        get("boot-socket-left"),
        "0",
        "the vsock socket is removed on exit; {all}"
    );
    assert!(stderr_of("boot").contains("guest shut down"), "{all}");

    assert_eq!(get("priv-ready"), "1", "{all}");
    assert_eq!(get("priv-capeff"), "0000000000000000", "{all}");
    assert_eq!(get("priv-capprm"), "0000000000000000", "{all}");
    assert_eq!(get("priv-nnp"), "1", "{all}");
    let threads: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("THREAD "))
        .collect();
    for name in ["vcpu0", "devices"] {
        let line = threads
            .iter()
            .find(|l| l.starts_with(&format!("THREAD {name} ")))
            .unwrap_or_else(|| panic!("no `{name}` thread; {all}"));
        assert!(
            line.ends_with("seccomp=2"),
            "{name} not under a seccomp filter: {line}"
        );
    }
    assert_eq!(
        get("priv-killed"),
        "5",
        "SIGTERM stops the VM cleanly; {all}"
    );
    assert_eq!(
        get("priv-socket-left"),
        "0",
        "and removes its vsock socket; {all}"
    );

    assert_eq!(get("panic"), "3", "a guest panic is exit status 3; {all}");
    assert!(
        stderr_of("panic").contains(
            "guest kernel panic: Kernel panic - not syncing: VFS: Unable to mount root fs"
        ),
        "{all}"
    );
    assert_eq!(get("junk-kernel"), "1", "{all}");
    assert!(stderr_of("junk").contains("uncompressed ELF"), "{all}");

    assert_eq!(get("big"), "0", "16 vCPUs, 8 GiB; {all}");
    assert_eq!(get("big-cpus"), "1", "all 16 vCPUs came up; {all}");
    assert_eq!(
        get("big-high-ram"),
        "1",
        "RAM above 4 GiB in the e820 map; {all}"
    );
    assert_eq!(get("big-ready"), "1", "{all}");

    for n in 1..=4 {
        assert_eq!(get(&format!("multi{n}")), "0", "VM {n} of 4; {all}");
        assert_eq!(get(&format!("multi{n}-ready")), "1", "VM {n} of 4; {all}");
    }
    assert_eq!(run.exit_code, 0, "{all}");
}
