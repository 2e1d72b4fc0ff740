//! One stream connection between a guest vsock socket and a host Unix stream: the
//! virtio-vsock connection state machine with credit-based flow control.
//!
//! Flow control, both directions:
//! - guest → host: we advertise `buf_alloc` = [`CONN_BUF_SIZE`] and `fwd_cnt` = bytes written to
//!   the host stream. Data the host stream does not take at once waits in `to_host`, which the
//!   guest's credit bounds; a guest that overruns it is reset.
//! - host → guest: we read from the host stream only as much as the guest's credit
//!   (`peer_buf_alloc - (tx_cnt - peer_fwd_cnt)`) and the offered rx buffer allow. Out of credit,
//!   we stop reading (and ask once with CREDIT_REQUEST) until the guest reports progress.
//!
//! The connection never blocks: its stream is non-blocking and [`Connection::interest`] says
//! which epoll events the muxer should wait for. Reading is edge-like: after a readable event the
//! connection stops polling for input until a read returns `WouldBlock`, so an unread socket
//! cannot spin the event loop while the guest has no buffers or credit.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use event_manager::EventSet;
use vm_memory::bitmap::BitmapSlice;
use vm_memory::{ReadVolatile, VolatileMemoryError, VolatileSlice, WriteVolatile};

use super::packet::{HOST_CID, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use crate::devices::virtio::ratelimit::guest_warn;

/// Receive buffer we advertise to the guest per connection (bytes in flight to the host).
pub const CONN_BUF_SIZE: u32 = 256 * 1024;
/// Forwarded bytes not yet reported to the guest that trigger an unsolicited CREDIT_UPDATE.
const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// How long a connection the guest closed may take to hand its last data to the host stream.
const CLOSE_DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest payload we put in one rx packet.
const MAX_RX_PAYLOAD: usize = 64 * 1024;

/// Where the connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent (or queued) to the guest, waiting for RESPONSE.
    AwaitingResponse,
    /// Data flows.
    Established,
}

/// A guest socket ↔ host Unix stream pairing.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    guest_cid: u64,
    local_port: u32,
    peer_port: u32,
    state: ConnState,
    /// Control packets to send to the guest, oldest first (a few at most: duplicates coalesce).
    pending: VecDeque<u16>,
    /// RST sent or received: the muxer frees the connection.
    closed: bool,
    /// Host-initiated connections must be answered, and closed connections drained to the
    /// host, before this instant.
    deadline: Option<Instant>,

    /// Bytes on their way to the host stream.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are not guest data (the `OK <port>\n` line).
    to_host_uncounted: usize,
    /// Guest data written to the host stream.
    fwd_cnt: Wrapping<u32>,
    /// `fwd_cnt` as last reported to the guest.
    last_fwd_cnt_sent: Wrapping<u32>,

    /// The guest's receive buffer size.
    peer_buf_alloc: u32,
    /// Bytes the guest has consumed of what we sent.
    peer_fwd_cnt: Wrapping<u32>,
    /// Bytes we sent to the guest.
    tx_cnt: Wrapping<u32>,
    /// The host stream reported input we have not drained yet.
    host_readable: bool,
    /// The host stream reached end of file (SHUTDOWN sent to the guest).
    host_eof: bool,
    /// A CREDIT_REQUEST is outstanding.
    credit_requested: bool,
    /// `SHUTDOWN_*` flags the guest sent.
    peer_shutdown: u32,
}

impl Connection {
    /// A connection the host asked for: REQUEST is queued; `OK <local_port>` goes to the host
    /// client once the guest answers.
    pub fn host_initiated(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        deadline: Instant,
    ) -> Self {
        let mut conn = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            ConnState::AwaitingResponse,
        );
        conn.deadline = Some(deadline);
        conn.pending.push_back(op::REQUEST);
        conn
    }

    /// A connection the guest asked for with `request`, already connected to the host
    /// listener: RESPONSE is queued.
    pub fn guest_initiated(stream: UnixStream, request: &Header) -> Self {
        let mut conn = Self::new(
            stream,
            request.src_cid,
            request.dst_port,
            request.src_port,
            ConnState::Established,
        );
        conn.update_peer_credit(request);
        conn.pending.push_back(op::RESPONSE);
        conn
    }

    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: ConnState,
    ) -> Self {
        Self {
            stream,
            guest_cid,
            local_port,
            peer_port,
            state,
            pending: VecDeque::new(),
            closed: false,
            deadline: None,
            to_host: VecDeque::new(),
            to_host_uncounted: 0,
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            tx_cnt: Wrapping(0),
            host_readable: false,
            host_eof: false,
            credit_requested: false,
            peer_shutdown: 0,
        }
    }

    /// The host stream (for epoll registration).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// Gives up the host stream (to be unregistered from epoll, then closed).
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// The host-side port.
    pub fn local_port(&self) -> u32 {
        self.local_port
    }

    /// The guest-side port.
    pub fn peer_port(&self) -> u32 {
        self.peer_port
    }

    /// The connection's state.
    pub fn state(&self) -> ConnState {
        self.state
    }

    /// True once the connection should be freed (RST sent or received).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// True when a host-initiated connection was not answered in time.
    pub fn is_expired(&self, now: Instant) -> bool {
        !self.closed && self.deadline.is_some_and(|d| now >= d)
    }

    /// True while a deadline runs: waiting for the guest's RESPONSE, or for the host stream to
    /// take the last data of a connection the guest closed.
    pub fn has_deadline(&self) -> bool {
        !self.closed && self.deadline.is_some()
    }

    /// The epoll events to wait for on the host stream (empty: unregister).
    pub fn interest(&self) -> EventSet {
        let mut set = EventSet::empty();
        if self.closed {
            return set;
        }
        if self.state == ConnState::Established
            && !self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
        {
            set |= EventSet::IN;
        }
        if !self.to_host.is_empty() {
            set |= EventSet::OUT;
        }
        set
    }

    /// Credit the guest currently gives us.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.tx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Whether the connection has a packet for the guest right now.
    pub fn has_rx(&self) -> bool {
        !self.pending.is_empty() || self.wants_data_rx()
    }

    fn wants_data_rx(&self) -> bool {
        !self.closed
            && self.state == ConnState::Established
            && self.host_readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Gives up on the connection: a RST goes to the guest, then the connection is freed.
    pub fn reset(&mut self) {
        if self.closed {
            return;
        }
        if self.pending.front() == Some(&op::REQUEST) {
            // The guest never heard of this connection: nothing to reset on its side.
            self.closed = true;
            self.pending.clear();
            return;
        }
        self.pending.clear();
        self.pending.push_back(op::RST);
        self.to_host.clear();
        self.host_readable = false;
    }

    /// The host stream has input (or hung up: reading tells).
    pub fn on_host_readable(&mut self) {
        if self.state == ConnState::Established && !self.host_eof {
            self.host_readable = true;
            self.request_credit_if_starved();
        }
    }

    /// The host stream can take more bytes.
    pub fn on_host_writable(&mut self) {
        self.flush_to_host();
    }

    /// Handles a packet the guest sent on this connection.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if self.closed {
            return;
        }
        self.update_peer_credit(hdr);
        match (self.state, hdr.op) {
            (_, op::RST) => {
                self.closed = true;
                self.pending.clear();
            }
            (ConnState::AwaitingResponse, op::RESPONSE) => {
                self.state = ConnState::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.local_port);
                self.to_host_uncounted += line.len();
                self.to_host.extend(line.as_bytes());
                self.flush_to_host();
            }
            (ConnState::Established, op::RW) => self.forward_to_host(data),
            (ConnState::Established, op::CREDIT_UPDATE) => {}
            (ConnState::Established, op::CREDIT_REQUEST) => self.queue_credit_update(),
            (ConnState::Established, op::SHUTDOWN) => self.on_guest_shutdown(hdr.flags),
            (state, other) => {
                guest_warn!(
                    ?state,
                    op = other,
                    "vsock: unexpected packet; resetting the connection"
                );
                self.reset();
            }
        }
    }

    fn update_peer_credit(&mut self, hdr: &Header) {
        let before = self.peer_credit();
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        if self.peer_credit() > before {
            self.credit_requested = false;
        }
    }

    fn on_guest_shutdown(&mut self, flags: u32) {
        self.peer_shutdown |= flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
        if self.peer_shutdown & SHUTDOWN_SEND == 0 {
            return;
        }
        if self.to_host.is_empty() {
            self.finish_guest_send();
        } else if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            // The guest closed its socket and waits (a few seconds) for our RST. Everything it
            // sent was covered by our credit, so deliver it first; `flush_to_host` finishes.
            self.deadline = Some(Instant::now() + CLOSE_DRAIN_TIMEOUT);
        }
    }

    /// All the guest's data is with the host: pass its end of stream on, and end the
    /// connection if the guest closed it completely.
    fn finish_guest_send(&mut self) {
        self.shutdown_host_write();
        if self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
            self.reset();
        }
    }

    fn shutdown_host_write(&mut self) {
        if let Err(err) = self.stream.shutdown(Shutdown::Write)
            && err.kind() != io::ErrorKind::NotConnected
        {
            tracing::debug!(%err, "vsock: shutting down the host stream failed");
        }
    }

    fn forward_to_host<B: BitmapSlice>(&mut self, data: Option<&VolatileSlice<'_, B>>) {
        let Some(data) = data else {
            return;
        };
        if self.peer_shutdown & SHUTDOWN_SEND != 0 {
            guest_warn!("vsock: guest sent data after SHUTDOWN(SEND); resetting");
            self.reset();
            return;
        }
        let len = data.len();
        let queued = self.to_host.len() - self.to_host_uncounted;
        if queued.saturating_add(len) > CONN_BUF_SIZE as usize {
            guest_warn!(len, queued, "vsock: guest overran its credit; resetting");
            self.reset();
            return;
        }
        let mut written = 0;
        if self.to_host.is_empty() {
            match self.stream.write_volatile(data) {
                Ok(n) => written = n,
                Err(VolatileMemoryError::IOError(err))
                    if err.kind() == io::ErrorKind::WouldBlock => {}
                Err(err) => {
                    tracing::debug!(%err, "vsock: host stream write failed; resetting");
                    self.reset();
                    return;
                }
            }
            self.count_forwarded(written);
        }
        // Queue the rest, copied through a small stack buffer (no temporary allocation).
        let mut chunk = [0u8; 4096];
        let mut offset = written;
        while offset < len {
            let Ok(tail) = data.offset(offset) else {
                break;
            };
            let n = tail.copy_to(&mut chunk[..]);
            if n == 0 {
                break;
            }
            self.to_host.extend(&chunk[..n]);
            offset += n;
        }
        self.maybe_credit_update();
    }

    /// Writes as much of `to_host` as the host stream takes.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => break,
                Ok(n) => {
                    self.to_host.drain(..n);
                    let uncounted = n.min(self.to_host_uncounted);
                    self.to_host_uncounted -= uncounted;
                    self.count_forwarded(n - uncounted);
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::debug!(%err, "vsock: host stream write failed; resetting");
                    self.reset();
                    return;
                }
            }
        }
        if self.to_host.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 {
            self.finish_guest_send();
        }
        self.maybe_credit_update();
    }

    fn count_forwarded(&mut self, n: usize) {
        // n ≤ CONN_BUF_SIZE + a short line, far below u32::MAX.
        self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
    }

    fn maybe_credit_update(&mut self) {
        if self.state == ConnState::Established
            && (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
        {
            self.queue_credit_update();
        }
    }

    fn queue_credit_update(&mut self) {
        if !self.closed
            && !self.pending.contains(&op::CREDIT_UPDATE)
            && !self.pending.contains(&op::RST)
        {
            self.pending.push_back(op::CREDIT_UPDATE);
        }
    }

    fn request_credit_if_starved(&mut self) {
        if self.host_readable && self.peer_credit() == 0 && !self.credit_requested && !self.closed {
            self.credit_requested = true;
            self.pending.push_back(op::CREDIT_REQUEST);
        }
    }

    fn header(&self, op: u16) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The next packet for the guest, with data read into `data` (the rx buffer's payload
    /// area) when it is a RW packet: returns the header and the payload length, or `None` when
    /// there is nothing to send after all (the host stream had no data).
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<(Header, usize)> {
        if let Some(op) = self.pending.pop_front() {
            return Some((self.control_packet(op), 0));
        }
        if !self.wants_data_rx() {
            return None;
        }
        let data = data?;
        let credit = usize::try_from(self.peer_credit()).unwrap_or(usize::MAX);
        let max = data.len().min(credit).min(MAX_RX_PAYLOAD);
        let mut buf = data.subslice(0, max).ok()?;
        match self.stream.read_volatile(&mut buf) {
            Ok(0) => {
                self.host_eof = true;
                self.host_readable = false;
                let mut hdr = self.header(op::SHUTDOWN);
                hdr.flags = SHUTDOWN_SEND;
                self.last_fwd_cnt_sent = self.fwd_cnt;
                Some((hdr, 0))
            }
            Ok(n) => {
                self.tx_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                let mut hdr = self.header(op::RW);
                hdr.len = u32::try_from(n).unwrap_or(u32::MAX);
                self.last_fwd_cnt_sent = self.fwd_cnt;
                self.request_credit_if_starved();
                Some((hdr, n))
            }
            Err(VolatileMemoryError::IOError(err)) if err.kind() == io::ErrorKind::WouldBlock => {
                self.host_readable = false;
                None
            }
            Err(err) => {
                tracing::debug!(%err, "vsock: host stream read failed; resetting");
                self.reset();
                self.fill_rx::<B>(None)
            }
        }
    }

    fn control_packet(&mut self, op: u16) -> Header {
        if op == op::RST {
            self.closed = true;
        }
        if op == op::CREDIT_UPDATE || op == op::RESPONSE || op == op::REQUEST {
            self.last_fwd_cnt_sent = self.fwd_cnt;
        }
        self.header(op)
    }
}

#[cfg(test)]
mod tests;
