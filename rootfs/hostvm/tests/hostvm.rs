//! Boots real host VMs (QEMU TCG with emulated SVM). Needs qemu-system-x86, busybox-static,
//! cpio and kmod on this machine and reachable Debian package archives on first use; the last
//! test also needs `roost images build` to have built the kernel and the `base` image. Missing
//! pieces fail these tests with a message, never skip them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_hostvm::cpio::{Entry, Manifest};
use roost_hostvm::kernel::HostKernel;
use roost_hostvm::{HostVm, Output, StreamKind};
use roost_images::{ArtefactIndex, Cache, Progress};

const TIMEOUT: Duration = Duration::from_secs(900);

/// Nested QEMU inside the host VM, as the integration baselines run it.
const NESTED_QEMU: &str = "qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,acpi=off \
    -accel kvm -cpu host -m 512 -smp 1 -nodefaults -no-user-config -display none -no-reboot \
    -serial stdio";

fn cache() -> Cache {
    Cache::from_env().expect("no cache directory: set ROOST_CACHE_DIR or HOME")
}

/// A busybox initramfs whose /init prints its uptime and reboots.
fn tiny_initramfs(dir: &Path) -> PathBuf {
    let mut m = Manifest::new();
    m.host_file("/bin/busybox", Path::new("/bin/busybox"))
        .expect("apt-get install busybox-static");
    m.insert(
        "/dev/console",
        Entry::CharDevice {
            major: 5,
            minor: 1,
            mode: 0o600,
        },
    )
    .unwrap();
    m.dir("/proc", 0o555).unwrap();
    m.bytes(
        "/init",
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\nread -r up _ < /proc/uptime\n\
         echo \"nested-guest: up $up\"\n/bin/busybox reboot -f\n",
        0o755,
    )
    .unwrap();
    let path = dir.join("nested.cpio");
    m.write_to_file(&path).unwrap();
    path
}

#[test]
fn kvm_works_inside_and_runs_a_nested_guest() {
    let kernel = HostKernel::ensure(&cache(), &Progress::silent()).expect("host VM kernel");
    let scratch = tempfile::tempdir().unwrap();
    let initrd = tiny_initramfs(scratch.path());
    let script = format!(
        "test -c /dev/kvm || {{ echo 'no /dev/kvm' >&2; exit 10; }}\n\
         {NESTED_QEMU} -kernel /opt/test/vmlinuz -initrd /opt/test/nested.cpio \
         -append 'console=ttyS0 reboot=t panic=-1 rdinit=/init quiet'"
    );
    let outcome = HostVm::builder()
        .timeout(TIMEOUT)
        .capture_output()
        .images(Vec::new())
        .file("/opt/test/vmlinuz", &kernel.vmlinuz)
        .file("/opt/test/nested.cpio", &initrd)
        .run(["sh", "-c", &script])
        .expect("host VM run");
    let stdout = String::from_utf8_lossy(&outcome.stdout);
    let stderr = String::from_utf8_lossy(&outcome.stderr);
    assert_eq!(
        outcome.exit_code, 0,
        "nested QEMU failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stdout.contains("nested-guest: up"),
        "the nested guest never reached its /init\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    eprintln!(
        "host VM: QEMU → /init {:?} (kernel uptime {:?}), ready {:?}, nested boot command {:?}",
        outcome.boot.qemu_to_init,
        outcome.boot.kernel_uptime_at_init,
        outcome.ready_after,
        outcome.command_time
    );
}

#[test]
fn exit_code_and_separate_streams_come_back() {
    let outcome = HostVm::builder()
        .timeout(TIMEOUT)
        .capture_output()
        .images(Vec::new())
        .env("GREETING", "it's here")
        .run([
            "sh",
            "-c",
            "echo \"out $GREETING\"; echo err >&2; echo $PATH; exit 7",
        ])
        .expect("host VM run");
    assert_eq!(outcome.exit_code, 7);
    let stdout = String::from_utf8(outcome.stdout).unwrap();
    assert_eq!(String::from_utf8(outcome.stderr).unwrap(), "err\n");
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("out it's here"));
    assert!(
        lines.next().unwrap().starts_with("/opt/roost/bin:"),
        "{stdout}"
    );
    assert_eq!(
        lines.next(),
        None,
        "kernel noise or extra output in stdout: {stdout}"
    );
    assert!(outcome.boot.qemu_to_init > outcome.boot.kernel_uptime_at_init);
    assert!(outcome.ready_after >= outcome.boot.qemu_to_init);
}

#[test]
fn argv_is_not_reparsed_by_a_shell() {
    let outcome = HostVm::builder()
        .timeout(TIMEOUT)
        .capture_output()
        .images(Vec::new())
        .run(["printf", "[%s]\\n", "a b", "$HOME", "it's"])
        .expect("host VM run");
    assert_eq!(outcome.exit_code, 0);
    assert_eq!(
        String::from_utf8(outcome.stdout).unwrap(),
        "[a b]\n[$HOME]\n[it's]\n"
    );
}

/// The `artefact_path` example binary, built by `cargo test`.
fn artefact_path_example() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(Path::parent).unwrap();
    let example = profile_dir.join("examples/artefact_path");
    assert!(
        example.exists(),
        "{} is missing: run this test through `cargo test -p roost-hostvm`, which builds examples",
        example.display()
    );
    example
}

#[test]
fn nested_guest_boots_our_kernel_and_base_rootfs() {
    let index = ArtefactIndex::new(&cache());
    for name in ["kernel", "rootfs-base"] {
        if let Err(e) = index.lookup(name) {
            panic!("this test needs the `{name}` artefact: {e}");
        }
    }
    let script = format!(
        "set -e\n\
         K=$(artefact_path kernel); R=$(artefact_path rootfs-base)\n\
         echo \"kernel $K rootfs $R\" >&2\n\
         read -r T0 _ < /proc/uptime\n\
         {NESTED_QEMU} -kernel \"$K\" \
         -append 'console=ttyS0 reboot=t panic=-1 root=/dev/vda ro quiet' \
         -drive id=root,file=\"$R\",format=raw,if=none,snapshot=on \
         -device virtio-blk-device,drive=root > /tmp/guest.log 2>&1 &\n\
         Q=$!\n\
         i=0\n\
         until grep -q '^roost-agent: ready' /tmp/guest.log; do\n\
           kill -0 $Q 2>/dev/null || {{ cat /tmp/guest.log; echo 'nested QEMU exited' >&2; exit 3; }}\n\
           i=$((i+1)); [ $i -lt 3000 ] || {{ cat /tmp/guest.log; echo 'no ready line in 300 s' >&2; exit 4; }}\n\
           usleep 100000\n\
         done\n\
         read -r T1 _ < /proc/uptime\n\
         grep '^roost-agent: ready' /tmp/guest.log\n\
         echo \"nested: QEMU start to ready line $T0 -> $T1 (host VM uptime)\" >&2\n\
         kill $Q; wait $Q || true\n"
    );
    let seen = Arc::new(Mutex::new(None));
    let stdout = Arc::new(Mutex::new(String::new()));
    let (seen_in, stdout_in) = (Arc::clone(&seen), Arc::clone(&stdout));
    let outcome = HostVm::builder()
        .timeout(TIMEOUT)
        .file("/opt/roost/bin/artefact_path", artefact_path_example())
        .output(Output::Lines(Box::new(move |line| {
            if line.stream == StreamKind::Stdout {
                if line.line.starts_with("roost-agent: ready") {
                    seen_in.lock().unwrap().get_or_insert(line.since_start);
                }
                stdout_in.lock().unwrap().push_str(line.line);
                stdout_in.lock().unwrap().push('\n');
            } else {
                eprintln!("[host VM] {}", line.line);
            }
        })))
        .run(["sh", "-c", &script])
        .expect("host VM run");
    let stdout = stdout.lock().unwrap().clone();
    assert_eq!(
        outcome.exit_code, 0,
        "nested boot failed; output:\n{stdout}"
    );
    assert!(
        outcome.attached.contains(&"rootfs-base".to_owned()),
        "{:?}",
        outcome.attached
    );
    let ready = seen.lock().unwrap().expect("no `roost-agent: ready` line");
    eprintln!(
        "host VM start → nested guest's ready line: {ready:?} (host VM /init at {:?}, command started at {:?})",
        outcome.boot.qemu_to_init, outcome.ready_after
    );
}
