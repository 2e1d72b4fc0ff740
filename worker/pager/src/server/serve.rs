//! Serving one VM's page faults from a memory chain.
//!
//! One thread waits on the userfaultfd and the VMM connection. Each missing-page fault is
//! answered with `UFFDIO_COPY` of the page from the chain (checksum verified) or
//! `UFFDIO_ZEROPAGE` for a zero page. A second thread, if a working set is given, copies those
//! pages in first-touch order meanwhile; a fault on a page the prefetch already placed (or the
//! other way round) finds `EEXIST`, and the faulting thread is simply woken.
//!
//! The server stops when the VMM closes the connection (the VM ended) or on a fatal error (a
//! corrupted page, an unexpected ioctl failure), which it reports on the connection before
//! closing it, so the VMM fails the VM with that message instead of waiting forever.

use std::io::Read;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use nix::errno::Errno;
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use userfaultfd::{Event, Uffd};

use super::protocol::{self, Handshake, PROTOCOL_VERSION, Region, Reply};
use super::working_set::{WORKING_SET_VERSION, WorkingSet};
use crate::chain::{Chain, ChainError};
use crate::format::PageSource;

/// How often the loop wakes to look at the "write the working set now" flag.
const POLL_INTERVAL_MS: u16 = 200;

/// What to do besides serving faults.
#[derive(Debug, Default)]
pub struct ServeOptions {
    /// Record touched pages and write them here (on [`ServeOptions::record_now`] or at the end).
    pub record: Option<PathBuf>,
    /// Pages to copy in before the guest asks for them.
    pub prefetch: Option<WorkingSet>,
    /// Set (e.g. from a SIGUSR1 handler) to write the recorded working set now and stop
    /// recording: "the pages touched until the first command finished".
    pub record_now: Option<&'static AtomicBool>,
}

/// What a finished serve did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeSummary {
    pub faults: u64,
    pub zero_faults: u64,
    pub prefetched: u64,
    pub recorded: Option<usize>,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("handshake with the VMM failed")]
    Handshake(#[from] protocol::ProtocolError),
    #[error("the VMM's memory does not match the chain: {0}")]
    Mismatch(String),
    #[error("could not read a page from the chain")]
    Chain(#[from] ChainError),
    #[error("userfaultfd operation failed")]
    Uffd(#[from] userfaultfd::Error),
    #[error("polling the userfaultfd failed")]
    Poll(#[source] Errno),
    #[error("fault at {0:#x} is outside every registered region")]
    Stray(u64),
    #[error("could not write the working set")]
    WorkingSet(#[from] super::working_set::WorkingSetError),
}

/// Accepts the handshake on `stream`, checks it against `chain`, then serves faults until the
/// VMM disconnects.
pub fn serve(
    chain: &Chain,
    stream: UnixStream,
    options: &ServeOptions,
) -> Result<ServeSummary, ServeError> {
    let (handshake, fd) = protocol::recv_handshake(&stream)?;
    if let Err(reason) = check(chain, &handshake) {
        let _ = protocol::send_reply(
            &stream,
            &Reply {
                ok: false,
                error: Some(reason.clone()),
            },
        );
        return Err(ServeError::Mismatch(reason));
    }
    if let Some(set) = &options.prefetch
        && set.header_sha256 != chain.header_sha256()
    {
        let reason = "the prefetch working set belongs to another snapshot".to_owned();
        let _ = protocol::send_reply(
            &stream,
            &Reply {
                ok: false,
                error: Some(reason.clone()),
            },
        );
        return Err(ServeError::Mismatch(reason));
    }
    protocol::send_reply(
        &stream,
        &Reply {
            ok: true,
            error: None,
        },
    )?;
    let server = Server::new(chain, handshake.regions, fd);
    let done = AtomicBool::new(false);
    let result = std::thread::scope(|s| {
        let prefetch = options
            .prefetch
            .as_ref()
            .map(|set| s.spawn(|| server.prefetch(&set.pages, &done)));
        let result = server.run(&stream, options);
        done.store(true, Ordering::Relaxed);
        let prefetched = prefetch.map(|t| t.join().unwrap_or(Ok(0)));
        match (result, prefetched) {
            (Ok(mut summary), Some(Ok(n))) => {
                summary.prefetched = n;
                Ok(summary)
            }
            (Ok(_), Some(Err(e))) | (Err(e), _) => Err(e),
            (Ok(summary), None) => Ok(summary),
        }
    });
    if let Err(e) = &result {
        let _ = protocol::send_reply(
            &stream,
            &Reply {
                ok: false,
                error: Some(format!("page server failed: {}", error_chain(e))),
            },
        );
    }
    result
}

/// The error and its sources as one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

fn check(chain: &Chain, h: &Handshake) -> Result<(), String> {
    if h.version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} (this server speaks {PROTOCOL_VERSION})",
            h.version
        ));
    }
    if h.header_sha256 != chain.header_sha256() {
        return Err("the VM expects another memory snapshot (header SHA-256 differs)".into());
    }
    if h.page_size as usize != chain.page_size() {
        return Err(format!(
            "page size {} (the chain has {})",
            h.page_size,
            chain.page_size()
        ));
    }
    let ps = chain.page_size() as u64;
    let mut total = 0u64;
    for r in &h.regions {
        if r.len == 0 || r.len % ps != 0 || r.host_addr % ps != 0 || r.chain_offset % ps != 0 {
            return Err("a region is not page aligned".into());
        }
        if r.chain_offset
            .checked_add(r.len)
            .is_none_or(|end| end > chain.len_bytes())
        {
            return Err("a region lies beyond the chain".into());
        }
        total += r.len;
    }
    if total != chain.len_bytes() {
        return Err(format!(
            "the VM has {total} bytes of RAM, the chain {}",
            chain.len_bytes()
        ));
    }
    Ok(())
}

struct Server<'a> {
    chain: &'a Chain,
    regions: Vec<Region>,
    uffd: Uffd,
    page_size: usize,
}

impl<'a> Server<'a> {
    fn new(chain: &'a Chain, regions: Vec<Region>, fd: OwnedFd) -> Self {
        use std::os::fd::{FromRawFd, IntoRawFd};
        // SAFETY: `fd` is the userfaultfd the VMM sent; ownership moves into the Uffd, which
        // closes it on drop.
        let uffd = unsafe { Uffd::from_raw_fd(fd.into_raw_fd()) };
        Self {
            chain,
            regions,
            uffd,
            page_size: chain.page_size(),
        }
    }

    /// Chain page index of host address `addr`, and the page's host address.
    fn locate(&self, addr: u64) -> Option<(u64, u64)> {
        let ps = self.page_size as u64;
        let page_addr = addr & !(ps - 1);
        self.regions
            .iter()
            .find(|r| page_addr >= r.host_addr && page_addr - r.host_addr < r.len)
            .map(|r| ((r.chain_offset + page_addr - r.host_addr) / ps, page_addr))
    }

    /// Host address of chain page `index`.
    fn host_addr(&self, index: u64) -> Option<u64> {
        let offset = index.checked_mul(self.page_size as u64)?;
        self.regions
            .iter()
            .find(|r| offset >= r.chain_offset && offset - r.chain_offset < r.len)
            .map(|r| r.host_addr + offset - r.chain_offset)
    }

    /// Places page `index` at `page_addr`, waking whoever waits for it. Returns its source.
    fn place(&self, index: u64, page_addr: u64, buf: &mut [u8]) -> Result<PageSource, ServeError> {
        let source = self.chain.read_page(index, buf)?;
        let dst = page_addr as *mut libc::c_void;
        let result = match source {
            PageSource::Zero => {
                // SAFETY: `dst` is a page of a region the VMM registered with this userfaultfd
                // (in the VMM's address space, not ours); the kernel validates the range, so a
                // wrong address fails the ioctl instead of touching our memory.
                unsafe { self.uffd.zeropage(dst, self.page_size, true) }.map(|_| ())
            }
            PageSource::Generation(_) => {
                // SAFETY: as above for `dst`; `buf` is a live page-sized buffer the kernel reads.
                unsafe {
                    self.uffd
                        .copy(buf.as_ptr().cast(), dst, self.page_size, true)
                }
                .map(|_| ())
            }
        };
        match result {
            Ok(()) => Ok(source),
            Err(e) if errno_of(&e) == Some(libc::EEXIST) => {
                // Already placed (prefetch vs fault race): just wake the faulting thread.
                self.uffd.wake(dst, self.page_size)?;
                Ok(source)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn run(&self, stream: &UnixStream, options: &ServeOptions) -> Result<ServeSummary, ServeError> {
        let mut summary = ServeSummary::default();
        let mut buf = vec![0u8; self.page_size];
        let mut recording = options
            .record
            .as_ref()
            .map(|_| Recorder::new(self.chain.pages()));
        loop {
            if let (Some(flag), Some(rec)) = (options.record_now, recording.as_ref())
                && flag.swap(false, Ordering::Relaxed)
            {
                summary.recorded = Some(self.write_recording(rec, options)?);
                recording = None;
            }
            let mut fds = [
                PollFd::new(self.uffd.as_fd(), PollFlags::POLLIN),
                PollFd::new(stream.as_fd(), PollFlags::POLLIN),
            ];
            match poll(&mut fds, PollTimeout::from(POLL_INTERVAL_MS)) {
                Ok(_) | Err(Errno::EINTR) => {}
                Err(e) => return Err(ServeError::Poll(e)),
            }
            let vmm_gone = fds[1].revents().is_some_and(|r| !r.is_empty());
            while let Some(event) = self.uffd.read_event()? {
                if let Event::Pagefault { addr, .. } = event {
                    let addr = addr as u64;
                    let (index, page_addr) = self.locate(addr).ok_or(ServeError::Stray(addr))?;
                    if self.place(index, page_addr, &mut buf)? == PageSource::Zero {
                        summary.zero_faults += 1;
                    }
                    summary.faults += 1;
                    if let Some(rec) = recording.as_mut() {
                        rec.touch(index);
                    }
                }
            }
            if vmm_gone && vmm_closed(stream) {
                break;
            }
        }
        if let Some(rec) = recording.as_ref() {
            summary.recorded = Some(self.write_recording(rec, options)?);
        }
        tracing::debug!(?summary, "VMM disconnected; page server done");
        Ok(summary)
    }

    fn write_recording(&self, rec: &Recorder, options: &ServeOptions) -> Result<usize, ServeError> {
        let Some(path) = &options.record else {
            return Ok(0);
        };
        WorkingSet {
            version: WORKING_SET_VERSION,
            header_sha256: self.chain.header_sha256().to_owned(),
            pages: rec.order.clone(),
        }
        .save(path)?;
        tracing::info!(pages = rec.order.len(), path = %path.display(), "working set written");
        Ok(rec.order.len())
    }

    /// Copies `pages` in order until done or told to stop; returns how many it placed.
    fn prefetch(&self, pages: &[u64], done: &AtomicBool) -> Result<u64, ServeError> {
        let mut buf = vec![0u8; self.page_size];
        let mut placed = 0;
        for &index in pages {
            if done.load(Ordering::Relaxed) {
                break;
            }
            let Some(addr) = self.host_addr(index) else {
                continue;
            };
            match self.place(index, addr, &mut buf) {
                Ok(_) => placed += 1,
                // The VMM went away mid-prefetch: the fault loop reports the end.
                Err(ServeError::Uffd(e))
                    if matches!(errno_of(&e), Some(libc::ESRCH | libc::ENOENT)) =>
                {
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        tracing::debug!(placed, of = pages.len(), "prefetch done");
        Ok(placed)
    }
}

/// The errno of a failed copy or zeropage.
fn errno_of(e: &userfaultfd::Error) -> Option<i32> {
    match e {
        userfaultfd::Error::CopyFailed(errno) | userfaultfd::Error::ZeropageFailed(errno) => {
            Some(*errno as i32)
        }
        _ => None,
    }
}

/// Whether the VMM closed its end (end-of-file or a broken connection; data sent is ignored).
fn vmm_closed(stream: &UnixStream) -> bool {
    let mut buf = [0u8; 256];
    let _ = stream.set_nonblocking(true);
    let closed = match (&*stream).read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// Touched pages in first-touch order.
struct Recorder {
    seen: Vec<u64>,
    order: Vec<u64>,
}

impl Recorder {
    fn new(pages: u64) -> Self {
        Self {
            seen: vec![0; usize::try_from(pages.div_ceil(64)).unwrap_or(0)],
            order: Vec::new(),
        }
    }

    fn touch(&mut self, index: u64) {
        let Some(word) = usize::try_from(index / 64)
            .ok()
            .and_then(|w| self.seen.get_mut(w))
        else {
            return;
        };
        let bit = 1 << (index % 64);
        if *word & bit == 0 {
            *word |= bit;
            self.order.push(index);
        }
    }
}
