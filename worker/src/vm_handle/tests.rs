//! The handle's life cycle without KVM: a shell script stands in for `roost vm run` and the
//! test itself plays the agent's announcement, so every freeing path (boot failure, ready
//! timeout, kill, an external kill, shutdown falling back to SIGKILL, drop) is checked on a
//! real child process, real sockets and a real runtime directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use futures::SinkExt;
use roost_proto::agent::{
    AgentMessage, Frame, FrameCodec, IdentityApplied, PROTOCOL_VERSION, Request,
};
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
    let args = read_when_written(&args_file).await;
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

/// A snapshot directory with its state file, and a fake VMM that records its arguments.
fn fake_snapshot(root: &Path, vmm_body: &str) -> RestoreConfig {
    let vmm = root.join("roost");
    std::fs::write(&vmm, format!("#!/bin/sh\n{vmm_body}\n")).unwrap();
    std::fs::set_permissions(&vmm, std::fs::Permissions::from_mode(0o755)).unwrap();
    let snapshot = root.join("snapshot");
    std::fs::create_dir(&snapshot).unwrap();
    std::fs::write(snapshot.join(SNAPSHOT_STATE_FILE), b"state").unwrap();
    let mut config = RestoreConfig::new(snapshot, root.join("vm"));
    config.vmm_binary = vmm;
    config.ready_timeout = Duration::from_secs(20);
    config
}

fn all_applied() -> IdentityApplied {
    IdentityApplied {
        hostname: true,
        entropy: true,
        clock: true,
        clock_step_ns: 5_000_000_000,
        envd: true,
        interpreter: false,
    }
}

/// Plays a restored agent behind the VMM's vsock socket in `dir`: binds it once the runtime
/// directory exists, drops the first `refuse` connections right after `CONNECT` (the guest
/// still processing the transport reset), then answers `identity` with `applied` and `hello`
/// with the identity's hostname. Returns the requests it served.
fn restored_agent(
    dir: PathBuf,
    refuse: usize,
    applied: IdentityApplied,
) -> JoinHandle<Vec<Request>> {
    use futures::StreamExt;
    use roost_proto::agent::Operation;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    tokio::spawn(async move {
        while !dir.exists() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let listener = tokio::net::UnixListener::bind(dir.join("vsock.sock")).unwrap();
        let mut served = Vec::new();
        let mut hostname = String::new();
        let mut refused = 0;
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let mut stream = tokio::io::BufReader::new(stream);
            let mut line = String::new();
            stream.read_line(&mut line).await.unwrap();
            assert_eq!(line, "CONNECT 1025\n");
            if refused < refuse {
                refused += 1;
                continue;
            }
            stream.write_all(b"OK 1\n").await.unwrap();
            let mut framed =
                tokio_util::codec::Framed::new(stream.into_inner(), FrameCodec::<Request>::new());
            let Some(Ok(Frame::Message(request))) = framed.next().await else {
                panic!("no request")
            };
            let reply = match &request.op {
                Operation::Identity(identity) => {
                    hostname = identity.hostname.clone();
                    AgentMessage::IdentityApplied(applied)
                }
                Operation::Hello => AgentMessage::Hello(Hello {
                    protocol_version: PROTOCOL_VERSION,
                    min_protocol_version: PROTOCOL_VERSION,
                    agent_version: "test".into(),
                    hostname: hostname.clone(),
                }),
                other => panic!("unexpected {other:?}"),
            };
            framed.send(Frame::Message(reply)).await.unwrap();
            let done = matches!(request.op, Operation::Hello);
            served.push(request);
            if done {
                return served;
            }
        }
    })
}

/// Plays the VMM's control API on `dir`/api.sock: answers each request line with the next of
/// `replies`, returns the request lines.
fn control_api(dir: PathBuf, replies: Vec<&'static str>) -> JoinHandle<Vec<String>> {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    // Bound before returning, so that the first request finds it.
    let listener = std::os::unix::net::UnixListener::bind(dir.join("api.sock")).unwrap();
    listener.set_nonblocking(true).unwrap();
    tokio::spawn(async move {
        let listener = tokio::net::UnixListener::from_std(listener).unwrap();
        let mut requests = Vec::new();
        for reply in replies {
            let (stream, _) = listener.accept().await.unwrap();
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            tokio::io::BufReader::new(read)
                .read_line(&mut line)
                .await
                .unwrap();
            write.write_all(reply.as_bytes()).await.unwrap();
            requests.push(line);
        }
        requests
    })
}

#[tokio::test]
async fn restore_retries_until_the_agent_answers_and_hands_it_its_identity() {
    let root = tempfile::tempdir().unwrap();
    let args_file = root.path().join("args");
    let config = fake_snapshot(
        root.path(),
        &format!("echo \"$@\" > {}\nexec sleep 600", args_file.display()),
    );
    let snapshot = config.snapshot_dir.clone();
    let agent = restored_agent(config.runtime_dir.clone(), 3, all_applied());
    let identity = IdentityRequest::new("sb-1", "clone-1").unwrap();
    let vm = VmHandle::restore(config, &identity).await.unwrap();
    let served = agent.await.unwrap();
    assert_eq!(vm.hello().hostname, "clone-1");
    assert_eq!(served.len(), 2, "identity, then hello: {served:?}");
    assert_eq!(
        served[0].op,
        roost_proto::agent::Operation::Identity(identity)
    );
    let dir = vm.runtime_dir().to_owned();
    let args = read_when_written(&args_file).await;
    assert_eq!(
        args,
        format!(
            "vm run --restore {snap} --vsock-uds {dir}/vsock.sock --serial-log {dir}/serial.log \
             --api-socket {dir}/api.sock --rootfs-overlay {dir}/rootfs.cow --seccomp enforce\n",
            snap = snapshot.display(),
            dir = dir.display()
        )
    );
    let pid = vm.vmm_pid();
    drop(vm);
    assert!(!pid_alive(pid));
    assert!(!dir.exists(), "runtime directory removed");
}

#[tokio::test]
async fn an_agent_that_leaves_entropy_unapplied_fails_the_restore() {
    let root = tempfile::tempdir().unwrap();
    let config = fake_snapshot(root.path(), "exec sleep 600");
    let dir = config.runtime_dir.clone();
    let applied = IdentityApplied {
        entropy: false,
        ..all_applied()
    };
    let _agent = restored_agent(dir.clone(), 0, applied);
    let identity = IdentityRequest::new("sb-1", "clone-1").unwrap();
    let error = VmHandle::restore(config, &identity).await.unwrap_err();
    assert!(
        matches!(
            error,
            BootError::Identity {
                source: IdentityError::Incomplete(_),
                ..
            }
        ),
        "{error}"
    );
    assert!(!dir.exists(), "runtime directory removed");
}

#[tokio::test]
async fn a_silent_restored_agent_times_out_and_a_dying_vmm_is_reported() {
    let root = tempfile::tempdir().unwrap();
    let pid_file = root.path().join("pid");
    let mut config = fake_snapshot(
        root.path(),
        &format!("echo $$ > {}\nexec sleep 600", pid_file.display()),
    );
    config.ready_timeout = Duration::from_millis(500);
    let dir = config.runtime_dir.clone();
    let identity = IdentityRequest::new("sb-1", "clone-1").unwrap();
    let error = VmHandle::restore(config, &identity).await.unwrap_err();
    let BootError::Identity {
        source: IdentityError::Timeout { last },
        ..
    } = &error
    else {
        panic!("{error}")
    };
    assert!(
        matches!(last, Some(roost_agent_client::Error::Connect { .. })),
        "the last attempt's failure is kept: {last:?}"
    );
    assert!(!dir.exists());
    let pid: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!pid_alive(pid), "the VMM was killed and reaped");

    let root = tempfile::tempdir().unwrap();
    let config = fake_snapshot(
        root.path(),
        "echo 'snapshot state: bad checksum' >&2\nexit 1",
    );
    let error = VmHandle::restore(config, &identity).await.unwrap_err();
    let BootError::VmmExited { exit, log } = &error else {
        panic!("{error}")
    };
    assert_eq!(*exit, VmmExit::StartFailed);
    assert!(log.contains("bad checksum"), "{log}");
}

#[tokio::test]
async fn a_missing_snapshot_creates_nothing() {
    let root = tempfile::tempdir().unwrap();
    let config = fake_snapshot(root.path(), "exit 0");
    std::fs::remove_file(config.snapshot_dir.join(SNAPSHOT_STATE_FILE)).unwrap();
    let dir = config.runtime_dir.clone();
    let identity = IdentityRequest::new("sb-1", "clone-1").unwrap();
    let error = VmHandle::restore(config, &identity).await.unwrap_err();
    assert!(matches!(error, BootError::Config(_)), "{error}");
    assert!(!dir.exists());
}

#[tokio::test]
async fn pause_resume_and_snapshot_go_through_the_control_api() {
    let root = tempfile::tempdir().unwrap();
    let config = fake_snapshot(root.path(), "exec sleep 600");
    let agent = restored_agent(config.runtime_dir.clone(), 0, all_applied());
    let identity = IdentityRequest::new("sb-1", "clone-1").unwrap();
    let vm = VmHandle::restore(config, &identity).await.unwrap();
    agent.await.unwrap();
    let api = control_api(
        vm.runtime_dir().to_owned(),
        vec![
            "{\"ok\":true,\"state\":\"paused\"}\n",
            "{\"ok\":true,\"state\":\"running\"}\n",
            "{\"ok\":true,\"state\":\"running\",\"snapshot\":{\"dir\":\"/s/2\",\"kind\":\"diff\",\
             \"memory_pages_written\":3,\"memory_depth\":2,\"paused_ms\":4,\"state_bytes\":5}}\n",
            "{\"ok\":false,\"error\":\"no space left on device\"}\n",
        ],
    );
    vm.pause().await.unwrap();
    vm.resume().await.unwrap();
    let info = vm
        .snapshot(
            Path::new("/s/2"),
            SnapshotKind::Diff,
            Some(Path::new("/s/1")),
            true,
        )
        .await
        .unwrap();
    assert_eq!((info.memory_pages_written, info.memory_depth), (3, 2));
    let error = vm
        .snapshot(Path::new("/s/3"), SnapshotKind::Full, None, false)
        .await
        .unwrap_err();
    assert!(
        matches!(&error, VmError::Api(ApiError::Refused(m)) if m == "no space left on device"),
        "{error}"
    );
    assert_eq!(
        api.await.unwrap(),
        [
            "{\"op\":\"pause\"}\n",
            "{\"op\":\"resume\"}\n",
            "{\"op\":\"snapshot\",\"dir\":\"/s/2\",\"kind\":\"diff\",\"parent\":\"/s/1\",\"resume\":true}\n",
            "{\"op\":\"snapshot\",\"dir\":\"/s/3\",\"kind\":\"full\",\"resume\":false}\n",
        ]
    );
    let dir = vm.runtime_dir().to_owned();
    assert_eq!(vm.kill(), VmmExit::Signal(9));
    assert!(!dir.exists(), "api socket and directory removed");
}

#[tokio::test]
async fn a_booted_vm_serves_the_control_api_only_when_asked() {
    let root = tempfile::tempdir().unwrap();
    let vm = booted(root.path()).await;
    let error = vm.pause().await.unwrap_err();
    assert!(matches!(error, VmError::NoControlApi), "{error}");
    drop(vm);

    let root = tempfile::tempdir().unwrap();
    let args_file = root.path().join("args");
    let mut config = fake_vm(
        root.path(),
        &format!("echo \"$@\" > {}\nexec sleep 600", args_file.display()),
    );
    config.control_api = true;
    let announcer = announce_when_listening(config.runtime_dir.clone());
    let vm = VmHandle::boot(config).await.unwrap();
    announcer.await.unwrap();
    // The hello is played by the test, so the fake VMM may not have written its arguments yet.
    let args = read_when_written(&args_file).await;
    assert!(
        args.trim_end().ends_with(&format!(
            "--api-socket {}/api.sock",
            vm.runtime_dir().display()
        )),
        "{args}"
    );
    let api = control_api(
        vm.runtime_dir().to_owned(),
        vec!["{\"ok\":true,\"state\":\"running\"}\n"],
    );
    assert_eq!(vm.run_state().await.unwrap(), RunState::Running);
    api.await.unwrap();
}

/// The contents of `path` once a fake VMM has written it (at most 10 s).
async fn read_when_written(path: &std::path::Path) -> String {
    for _ in 0..1000 {
        if let Ok(text) = std::fs::read_to_string(path)
            && !text.is_empty()
        {
            return text;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("{} was not written within 10 s", path.display());
}
