//! virtio-vsock end to end on real KVM, inside the host VM (QEMU TCG with emulated SVM).
//!
//! The guest's init is a small Python program (the base image has python3 and AF_VSOCK), so the
//! check depends only on the VMM and the guest kernel, not on the agent. The host side is this
//! test binary itself, started inside the host VM in probe mode next to `roost vm run`:
//! - host → guest: `CONNECT 1025` on the VM's Unix socket, `OK <port>`, 1 MiB to the guest
//!   (half-closed), which answers with the length and SHA-256 and then sends 2 MiB back;
//! - guest → host: the guest connects to CID 2 port 5000 (a Unix echo server at
//!   `<uds>_5000`), sends 0.5 MB (more than one credit window), half-closes and checks the echo;
//!   a connection to port 5001 (no listener) must be refused with ECONNRESET;
//! - the guest reboots; the VMM must exit 0 and remove its socket.
//!
//! Needs qemu-system-x86, the `kernel` and `rootfs-base` artefacts and a built `roost` binary
//! next to this test's profile directory; without them the test fails with a message.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;
use roost_images::{ArtefactIndex, Cache};
use sha2::{Digest, Sha256};

/// The guest's init (one line per statement; the kernel command line carries it hex-encoded).
const GUEST_PROGRAM: &str = r#"import socket as S,hashlib as H,ctypes
V=S.AF_VSOCK
def R(c):
 b=b''
 while 1:
  d=c.recv(65536)
  if not d:return b
  b+=d
s=S.socket(V,S.SOCK_STREAM);s.bind((S.VMADDR_CID_ANY,1025));s.listen(1);print('GUEST listening',flush=1)
c=s.accept()[0];b=R(c);c.sendall(('%d %s\n'%(len(b),H.sha256(b).hexdigest())).encode());c.sendall(bytes(range(256))*8192);c.close()
t=S.socket(V,S.SOCK_STREAM);t.connect((2,5000));p=bytes(range(251))*2000;t.sendall(p);t.shutdown(S.SHUT_WR);e=R(t);print('GUEST echo',len(e),e==p,flush=1)
u=S.socket(V,S.SOCK_STREAM)
try:u.connect((2,5001));print('GUEST refused no',flush=1)
except OSError as x:print('GUEST refused',x.errno,flush=1)
ctypes.CDLL(None).reboot(0x1234567)
"#;

const HOST_TO_GUEST: usize = 1 << 20;
const GUEST_TO_HOST: usize = 2 << 20;
const PROBE_TEST: &str = "probe_run_by_the_host_vm_test";

fn host_to_guest_payload() -> Vec<u8> {
    (0..HOST_TO_GUEST)
        .map(|i| u8::try_from(i % 241).unwrap())
        .collect()
}

fn report(name: &str, value: impl std::fmt::Display) {
    println!("RESULT {name} {value}");
}

/// Connects to the guest's port 1025, retrying while the guest boots.
fn connect_to_guest(uds: &Path, deadline: Instant) -> Option<UnixStream> {
    while Instant::now() < deadline {
        if let Ok(mut stream) = UnixStream::connect(uds) {
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .ok()?;
            stream.write_all(b"CONNECT 1025\n").ok()?;
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            if reader.read_line(&mut line).is_ok() && line.starts_with("OK ") {
                report("connect", "ok");
                return Some(reader.into_inner());
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// Probe mode: runs inside the host VM; prints `RESULT` lines for the outer test.
#[test]
#[ignore = "runs inside the host VM, started by vsock_in_host_vm_end_to_end"]
fn probe_run_by_the_host_vm_test() {
    let dir = PathBuf::from("/tmp/vsock-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("vm.sock");
    let echo = UnixListener::bind(dir.join("vm.sock_5000")).unwrap();
    std::thread::spawn(move || {
        for mut stream in echo.incoming().flatten() {
            std::thread::spawn(move || {
                let mut data = Vec::new();
                if stream.read_to_end(&mut data).is_ok() {
                    let _ = stream.write_all(&data);
                }
            });
        }
    });
    let cmdline = format!(
        "console=ttyS0 reboot=t panic=-1 root=/dev/vda ro rootfstype=ext4 quiet \
         init=/usr/bin/python3 -- -c \"exec(bytes.fromhex('{}'))\"",
        hex::encode(GUEST_PROGRAM)
    );
    let serial = dir.join("serial.log");
    let mut vmm = Command::new("roost")
        .args(["vm", "run", "--rootfs-ro", "--mem", "256", "--vsock-uds"])
        .arg(&uds)
        .arg("--serial-log")
        .arg(&serial)
        .args(["--cmdline", &cmdline])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();

    if let Some(mut stream) = connect_to_guest(&uds, Instant::now() + Duration::from_secs(120)) {
        let sent = host_to_guest_payload();
        stream.write_all(&sent).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        let mut back = Vec::new();
        match stream.read_to_end(&mut back) {
            Ok(_) => {
                let line_end = back.iter().position(|&b| b == b'\n').map_or(0, |n| n + 1);
                report(
                    "guest-digest",
                    String::from_utf8_lossy(&back[..line_end]).trim(),
                );
                report("guest-data-len", back.len() - line_end);
                let ok = back[line_end..]
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| usize::from(b) == i % 256);
                report("guest-data-pattern", ok);
            }
            Err(err) => report("guest-data-error", err),
        }
    } else {
        report("connect", "never");
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        match vmm.try_wait().unwrap() {
            Some(status) => break status.code().map_or(-1, |c| c),
            None if Instant::now() > deadline => {
                vmm.kill().unwrap();
                break -2;
            }
            None => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    report("vmm-exit", status);
    report("socket-left", uds.exists());
    let log = std::fs::read_to_string(&serial).unwrap_or_default();
    for line in log.lines() {
        println!("SERIAL {line}");
    }
}

#[test]
fn vsock_in_host_vm_end_to_end() {
    let cache = Cache::from_env().expect("no cache directory: set ROOST_CACHE_DIR or HOME");
    let index = ArtefactIndex::new(&cache);
    for name in ["kernel", "rootfs-base"] {
        if let Err(e) = index.lookup(name) {
            panic!("this test needs the `{name}` artefact (run `roost images build`): {e}");
        }
    }
    let me = std::env::current_exe().unwrap();
    let profile_dir = me.parent().and_then(Path::parent).unwrap().to_owned();
    let roost = profile_dir.join("roost");
    assert!(
        roost.exists(),
        "this test needs the roost binary at {} (cargo build -p roost, same profile)",
        roost.display()
    );
    let builder = HostVm::builder()
        .timeout(roost_hostvm::script::TEST_LIMIT)
        .binaries(vec![roost, me]);
    let run = ScriptRun::run_probe(builder, PROBE_TEST).expect("host VM run");
    let stdout = run.stdout.clone();
    let all = run.transcript();
    let get = |key: &str| -> String { run.expect_result(key).to_owned() };
    let serial = |needle: &str| stdout.lines().any(|l| l == format!("SERIAL {needle}"));

    let sent = host_to_guest_payload();
    let digest = format!("{} {}", sent.len(), hex::encode(Sha256::digest(&sent)));
    assert_eq!(get("connect"), "ok", "CONNECT 1025 → OK; {all}");
    assert_eq!(
        get("guest-digest"),
        digest,
        "guest received 1 MiB intact; {all}"
    );
    assert_eq!(get("guest-data-len"), GUEST_TO_HOST.to_string(), "{all}");
    assert_eq!(get("guest-data-pattern"), "true", "{all}");
    assert!(
        serial("GUEST echo 502000 True"),
        "guest → host echo over CID 2 port 5000; {all}"
    );
    assert!(
        serial("GUEST refused 104"),
        "a port without listener is reset (ECONNRESET); {all}"
    );
    assert_eq!(
        get("vmm-exit"),
        "0",
        "guest reboot ends the VMM cleanly; {all}"
    );
    assert_eq!(
        get("socket-left"),
        "false",
        "the vsock socket is removed; {all}"
    );
}
