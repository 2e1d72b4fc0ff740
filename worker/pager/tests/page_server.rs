//! The page server against plain anonymous memory in this test process (no KVM): faults served
//! from a chain, zero pages, working-set record and prefetch, refusal of a foreign snapshot, and
//! a killed server noticed by the VMM-side watchdog.

// The test geometry (4 KiB pages, a handful of them) fits every integer type it is cast to.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roost_pager::server::client::ClientError;
use roost_pager::server::{PagerLink, ProtocolError, RamRegion, ServeOptions, WorkingSet, serve};
use roost_pager::{Chain, ChainWriter};

const PS: usize = 4096;
const PAGES: usize = 64;

fn page(i: usize) -> Vec<u8> {
    (0..PS).map(|b| (i * 7 + b) as u8 | 1).collect()
}

/// Pages 0..PAGES with data on every page but multiples of 3 (zero).
fn write_chain(dir: &Path) -> Chain {
    let mut w = ChainWriter::full(dir, PS as u32, PAGES as u64).unwrap();
    for i in (0..PAGES).filter(|i| i % 3 != 0) {
        w.put_page(i as u64, &page(i)).unwrap();
    }
    w.finish().unwrap();
    Chain::open(dir).unwrap()
}

struct Mapping(*mut u8);

impl Mapping {
    fn new() -> Self {
        // SAFETY: a fresh anonymous private mapping; nothing else refers to it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PS * PAGES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        Self(p.cast())
    }

    fn region(&self) -> RamRegion {
        RamRegion {
            host: self.0,
            len: PS * PAGES,
            chain_offset: 0,
        }
    }

    fn read(&self, i: usize) -> Vec<u8> {
        // SAFETY: the mapping is PAGES pages long and lives as long as self; reading faults the
        // page in through the page server.
        unsafe { std::slice::from_raw_parts(self.0.add(i * PS), PS) }.to_vec()
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new().
        unsafe { libc::munmap(self.0.cast(), PS * PAGES) };
    }
}

fn expected(i: usize) -> Vec<u8> {
    if i.is_multiple_of(3) {
        vec![0; PS]
    } else {
        page(i)
    }
}

/// Serves `chain` in a thread for one connection; returns the socket path's listener thread.
fn serve_in_thread(
    dir: &Path,
    options: ServeOptions,
) -> (
    std::path::PathBuf,
    std::thread::JoinHandle<roost_pager::server::ServeSummary>,
) {
    let socket = dir.join("pager.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let chain_dir = dir.to_owned();
    let handle = std::thread::spawn(move || {
        let chain = Chain::open(&chain_dir).unwrap();
        let (stream, _) = listener.accept().unwrap();
        serve(&chain, stream, &options).unwrap()
    });
    (socket, handle)
}

#[test]
fn faults_are_served_from_the_chain_and_a_working_set_is_recorded_then_prefetched() {
    let dir = tempfile::tempdir().unwrap();
    let chain = write_chain(dir.path());
    let sha = chain.header_sha256().to_owned();
    let ws = dir.path().join("ws.json");

    // First restore: record what is touched (pages 5, 1, 9, 3 in that order).
    let (socket, server) = serve_in_thread(
        dir.path(),
        ServeOptions {
            record: Some(ws.clone()),
            ..Default::default()
        },
    );
    let mem = Mapping::new();
    let link = PagerLink::connect(
        &socket,
        &[mem.region()],
        PS as u32,
        &sha,
        Duration::from_secs(5),
    )
    .unwrap();
    for i in [5, 1, 9, 3] {
        assert_eq!(mem.read(i), expected(i), "page {i}");
    }
    drop(link);
    let summary = server.join().unwrap();
    assert_eq!((summary.faults, summary.zero_faults), (4, 2));
    let set = WorkingSet::load(&ws, &sha).unwrap();
    assert_eq!(set.pages, vec![5, 1, 9, 3]);
    drop(mem);

    // Second restore: prefetch that set, then read everything.
    std::fs::remove_file(&socket).unwrap();
    let (socket, server) = serve_in_thread(
        dir.path(),
        ServeOptions {
            prefetch: Some(set),
            ..Default::default()
        },
    );
    let mem = Mapping::new();
    let link = PagerLink::connect(
        &socket,
        &[mem.region()],
        PS as u32,
        &sha,
        Duration::from_secs(5),
    )
    .unwrap();
    for i in 0..PAGES {
        assert_eq!(mem.read(i), expected(i), "page {i}");
    }
    drop(link);
    let summary = server.join().unwrap();
    assert_eq!(summary.prefetched, 4);
    assert!(summary.faults <= PAGES as u64);
}

#[test]
fn a_vm_expecting_another_snapshot_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    write_chain(dir.path());
    let socket = dir.path().join("pager.sock");
    let listener = UnixListener::bind(&socket).unwrap();
    let chain_dir = dir.path().to_owned();
    let server = std::thread::spawn(move || {
        let chain = Chain::open(&chain_dir).unwrap();
        let (stream, _) = listener.accept().unwrap();
        serve(&chain, stream, &ServeOptions::default()).is_err()
    });
    let mem = Mapping::new();
    let err = PagerLink::connect(
        &socket,
        &[mem.region()],
        PS as u32,
        &"ab".repeat(32),
        Duration::from_secs(5),
    )
    .unwrap_err();
    assert!(
        matches!(err, ClientError::Handshake(ProtocolError::Refused(ref m)) if m.contains("another memory snapshot")),
        "{err:?}"
    );
    assert!(server.join().unwrap());
}

#[test]
fn a_killed_page_server_is_noticed_by_the_watchdog_within_a_bounded_time() {
    let dir = tempfile::tempdir().unwrap();
    let chain = write_chain(dir.path());
    let socket = dir.path().join("pager.sock");
    let mut child = Command::new(env!("CARGO_BIN_EXE_roost-pager"))
        .args(["serve", "--snapshot"])
        .arg(dir.path())
        .arg("--socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        assert!(Instant::now() < deadline, "page server never listened");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mem = Mapping::new();
    let link = PagerLink::connect(
        &socket,
        &[mem.region()],
        PS as u32,
        chain.header_sha256(),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(mem.read(2), expected(2));
    let (tx, rx) = std::sync::mpsc::channel();
    link.watch(move |lost| tx.send(lost).unwrap(), None)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let lost = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("watchdog did not report the dead page server");
    assert!(
        lost.message.contains("closed the connection"),
        "{}",
        lost.message
    );
    // The VMM's userfaultfd stays registered: untouched pages would block, never read as
    // silent zeros. (Not touched here: nothing would serve them.)
    drop(link);
}
