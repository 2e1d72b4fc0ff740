//! `roost vm run` refuses impossible VMs with a clear message and exit status 1, before it
//! touches KVM (so these run anywhere, without a usable /dev/kvm).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs `roost vm run ARGS`; fails the test if it does not end within 30 s (never a hang).
fn vm_run(args: &[&str]) -> (i32, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_roost"))
        .args(["vm", "run"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn roost");
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("roost vm run {args:?} did not finish within 30 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let output = child.wait_with_output().expect("collect output");
    (
        output.status.code().expect("exited, not killed"),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

struct Files {
    _dir: tempfile::TempDir,
    kernel: String,
    rootfs: String,
    dir: String,
}

fn files() -> Files {
    let dir = tempfile::tempdir().unwrap();
    let kernel = dir.path().join("vmlinux");
    let rootfs = dir.path().join("root.ext4");
    std::fs::write(&kernel, b"not really a kernel").unwrap();
    std::fs::write(&rootfs, vec![0u8; 4096]).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_owned();
    Files {
        kernel: s(&kernel),
        rootfs: s(&rootfs),
        dir: s(dir.path()),
        _dir: dir,
    }
}

fn assert_refused(args: &[&str], expected: &str) {
    let (code, stderr) = vm_run(args);
    assert_eq!(
        code, 1,
        "roost vm run {args:?} exited {code}; stderr:\n{stderr}"
    );
    assert!(
        stderr.contains(expected),
        "roost vm run {args:?}: expected `{expected}` in stderr:\n{stderr}"
    );
}

#[test]
fn vcpu_counts_outside_1_to_16_are_refused() {
    let f = files();
    for cpus in ["0", "17", "300"] {
        assert_refused(
            &["--kernel", &f.kernel, "--rootfs", &f.rootfs, "--cpus", cpus],
            &format!("{cpus} vCPUs requested: a VM has 1 to 16 vCPUs"),
        );
    }
}

#[test]
fn memory_outside_64_mib_to_32_gib_is_refused() {
    let f = files();
    for mem in ["0", "63", "32769"] {
        assert_refused(
            &["--kernel", &f.kernel, "--rootfs", &f.rootfs, "--mem", mem],
            &format!("{mem} MiB of memory requested: a VM has 64 MiB to 32768 MiB"),
        );
    }
}

#[test]
fn missing_files_are_named() {
    let f = files();
    let absent = format!("{}/absent", f.dir);
    assert_refused(
        &["--kernel", &absent, "--rootfs", &f.rootfs],
        &format!("kernel {absent} does not exist"),
    );
    assert_refused(
        &["--kernel", &f.kernel, "--rootfs", &absent],
        &format!("root filesystem image {absent} does not exist"),
    );
    assert_refused(
        &["--kernel", &f.dir, "--rootfs", &f.rootfs],
        "is not a regular file",
    );
    assert_refused(
        &[
            "--kernel",
            &f.kernel,
            "--rootfs",
            &f.rootfs,
            "--vsock-uds",
            &format!("{absent}/v.sock"),
        ],
        "the vsock socket's directory",
    );
}

#[test]
fn a_usage_error_is_status_2() {
    let (code, stderr) = vm_run(&["--cpus", "many"]);
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("--cpus"), "{stderr}");
}

/// On a machine whose /dev/kvm cannot run guests (this one: PVM), a valid configuration is
/// refused with the reason and the host-VM hint; where KVM works, the fake kernel is refused
/// instead. Either way: status 1 and a reason, never a hang.
#[test]
fn a_vm_that_cannot_run_here_says_why() {
    let f = files();
    let (code, stderr) = vm_run(&["--kernel", &f.kernel, "--rootfs", &f.rootfs]);
    assert_eq!(code, 1, "{stderr}");
    if Path::new("/sys/module/kvm_pvm").is_dir() {
        assert!(stderr.contains("kvm_pvm"), "{stderr}");
        assert!(
            stderr.contains("roost hostvm run -- roost vm run"),
            "{stderr}"
        );
    } else if Path::new("/dev/kvm").exists() {
        assert!(
            stderr.contains("uncompressed ELF") || stderr.contains("KVM"),
            "{stderr}"
        );
    } else {
        assert!(stderr.contains("no /dev/kvm"), "{stderr}");
        assert!(stderr.contains("roost hostvm run"), "{stderr}");
    }
}
