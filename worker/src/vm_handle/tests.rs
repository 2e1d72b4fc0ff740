//! The handle's life cycle without KVM: a shell script stands in for `roost vm run` and the
//! test itself plays the agent's announcement, so every freeing path (boot failure, ready
//! timeout, kill, an external kill, shutdown falling back to SIGKILL, drop) is checked on a
//! real child process, real sockets and a real runtime directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use futures::SinkExt;
use roost_proto::agent::{AgentMessage, Frame, FrameCodec, PROTOCOL_VERSION};
use tokio_util::codec::FramedWrite;

use super::*;

/// A config whose "VMM" is a shell script with `body`, in a fresh temp directory.
fn fake_vm(root: &Path, body: &str) -> VmHandleConfig {
    let vmm = root.join("roost");
    std::fs::write(&vmm, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(root.join("vmlinux"), b"elf").unwrap();
    std::fs::write(root.join("rootfs.ext4"), b"ext4").unwrap();
    let mut config = VmHandleConfig::new(
        root.join("vmlinux"),
        root.join("rootfs.ext4"),
        root.join("vm"),
    );
    config.vmm_binary = vmm;
    config.ready_timeout = Duration::from_secs(20);
    config
}

/// Plays the agent: waits for the ready listener in `dir`, then sends one hello.
fn announce_when_listening(dir: PathBuf) -> JoinHandle<()> {
    tokio::spawn(async move {
        let path = dir.join("vsock.sock_1024");
        let stream = loop {
            if let Ok(stream) = UnixStream::connect(&path).await {
                break stream;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let mut frames = FramedWrite::new(stream, FrameCodec::<AgentMessage>::new());
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: PROTOCOL_VERSION,
            agent_version: "test".into(),
            hostname: "fake".into(),
        };
        frames
            .send(Frame::Message(AgentMessage::Hello(hello)))
            .await
            .unwrap();
    })
}

fn pid_alive(pid: u32) -> bool {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap());
    nix::sys::signal::kill(pid, None).is_ok()
}

/// Boots a fake VM that sleeps (as a VMM would run) and is announced by the test.
async fn booted(root: &Path) -> VmHandle {
    let config = fake_vm(root, "exec sleep 600");
    let announcer = announce_when_listening(config.runtime_dir.clone());
    let vm = VmHandle::boot(config).await.unwrap();
    announcer.await.unwrap();
    vm
}

#[tokio::test]
async fn a_vmm_that_exits_first_is_reported_with_its_output() {
    let root = tempfile::tempdir().unwrap();
    let config = fake_vm(
        root.path(),
        r#"echo "guest kernel panic: Kernel panic - not syncing: test" >&2
while [ $# -gt 0 ]; do [ "$1" = --serial-log ] && echo "[ 0.1] booting" > "$2"; shift; done
exit 3"#,
    );
    let dir = config.runtime_dir.clone();
    let error = VmHandle::boot(config).await.unwrap_err();
    let BootError::VmmExited { exit, log } = &error else {
        panic!("{error}");
    };
    assert_eq!(*exit, VmmExit::GuestPanic);
    assert!(log.contains("not syncing: test"), "{log}");
    assert!(log.contains("[ 0.1] booting"), "{log}");
    assert!(!dir.exists(), "runtime directory removed");
}

#[tokio::test]
async fn a_silent_agent_times_out_and_the_vmm_is_killed() {
    let root = tempfile::tempdir().unwrap();
    let pid_file = root.path().join("pid");
    let mut config = fake_vm(
        root.path(),
        &format!("echo $$ > {}\nexec sleep 600", pid_file.display()),
    );
    config.ready_timeout = Duration::from_millis(500);
    let dir = config.runtime_dir.clone();
    let error = VmHandle::boot(config).await.unwrap_err();
    assert!(matches!(error, BootError::ReadyTimeout { .. }), "{error}");
    assert!(
        error.to_string().contains("did not announce itself"),
        "{error}"
    );
    assert!(!dir.exists(), "runtime directory removed");
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!pid_alive(pid), "the VMM was killed and reaped");
}

#[tokio::test]
async fn an_invalid_config_creates_nothing() {
    let root = tempfile::tempdir().unwrap();
    let mut config = fake_vm(root.path(), "exit 0");
    config.cpus = 0;
    let dir = config.runtime_dir.clone();
    let error = VmHandle::boot(config).await.unwrap_err();
    assert!(
        matches!(error, BootError::Config(ConfigError::Cpus(0))),
        "{error}"
    );
    assert!(!dir.exists());
}

#[tokio::test]
async fn boot_passes_the_configuration_to_the_vmm() {
    let root = tempfile::tempdir().unwrap();
    let args_file = root.path().join("args");
    let mut config = fake_vm(
        root.path(),
        &format!("echo \"$@\" > {}\nexec sleep 600", args_file.display()),
    );
    config.cpus = 2;
    config.mem_mib = 512;
    config.cmdline_extra = Some("init=/nonexistent".into());
    config.rootfs_mode = RootfsMode::WritableCopy;
    let announcer = announce_when_listening(config.runtime_dir.clone());
    let vm = VmHandle::boot(config).await.unwrap();
    announcer.await.unwrap();
    assert_eq!(vm.hello().hostname, "fake");
    let dir = vm.runtime_dir().to_owned();
    let args = std::fs::read_to_string(&args_file).unwrap();
    let expected = format!(
        "vm run --kernel {root}/vmlinux --rootfs {dir}/rootfs.img --cpus 2 --mem 512 \
         --vsock-uds {dir}/vsock.sock --serial-log {dir}/serial.log --seccomp enforce \
         --append init=/nonexistent\n",
        root = root.path().display(),
        dir = dir.display()
    );
    assert_eq!(args, expected);
    assert_eq!(
        std::fs::read(dir.join("rootfs.img")).unwrap(),
        b"ext4",
        "a private copy"
    );
    assert!(
        !dir.join("vsock.sock_1024").exists(),
        "ready listener closed after the hello"
    );
    drop(vm);
    assert!(!dir.exists());
}

#[tokio::test]
async fn kill_frees_the_process_and_the_directory() {
    let root = tempfile::tempdir().unwrap();
    let vm = booted(root.path()).await;
    let (pid, dir) = (vm.vmm_pid(), vm.runtime_dir().to_owned());
    assert!(pid_alive(pid));
    assert_eq!(vm.kill(), VmmExit::Signal(9));
    assert!(!pid_alive(pid));
    assert!(!dir.exists());
}

#[tokio::test]
async fn dropping_the_handle_frees_everything() {
    let root = tempfile::tempdir().unwrap();
    let vm = booted(root.path()).await;
    let (pid, dir) = (vm.vmm_pid(), vm.runtime_dir().to_owned());
    drop(vm);
    assert!(!pid_alive(pid));
    assert!(!dir.exists());
}

#[tokio::test]
async fn an_external_kill_is_noticed_and_operations_say_why() {
    let root = tempfile::tempdir().unwrap();
    let vm = booted(root.path()).await;
    let dir = vm.runtime_dir().to_owned();
    std::os::unix::net::UnixListener::bind(dir.join("vsock.sock")).unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(vm.vmm_pid()).unwrap());
    nix::sys::signal::kill(pid, Signal::SIGKILL).unwrap();
    let exit = tokio::time::timeout(Duration::from_secs(10), vm.exited())
        .await
        .unwrap();
    assert_eq!(exit, VmmExit::Signal(9));
    assert!(
        !dir.join("vsock.sock").exists(),
        "stale socket removed at once"
    );
    let error = vm.run(exec_argv(["true"])).await.unwrap_err();
    assert!(matches!(error, VmError::VmmExited { .. }), "{error}");
    assert!(error.to_string().contains("killed by signal 9"), "{error}");
    assert_eq!(
        vm.shutdown(Duration::from_secs(1)).await,
        VmmExit::Signal(9)
    );
    assert!(!dir.exists());
}

#[tokio::test]
async fn shutdown_without_an_agent_kills_after_the_grace_period() {
    let root = tempfile::tempdir().unwrap();
    let vm = booted(root.path()).await;
    let (pid, dir) = (vm.vmm_pid(), vm.runtime_dir().to_owned());
    // Nothing serves the vsock socket: the agent cannot be reached.
    let error = vm.run(exec_argv(["true"])).await.unwrap_err();
    assert!(matches!(error, VmError::Agent(_)), "{error}");
    let started = Instant::now();
    assert_eq!(
        vm.shutdown(Duration::from_millis(300)).await,
        VmmExit::Signal(9)
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(!pid_alive(pid));
    assert!(!dir.exists());
}
