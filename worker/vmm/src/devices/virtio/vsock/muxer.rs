//! The host side of the vsock device: one Unix socket per VM (Firecracker's "hybrid vsock").
//!
//! - Host → guest: a client connects to `uds_path`, writes `CONNECT <port>\n`, and gets
//!   `OK <hostport>\n` once the guest accepts; on refusal (guest RST) or timeout the stream is
//!   closed.
//! - Guest → host: a guest connection to CID 2, port P is connected to the Unix listener at
//!   `<uds_path>_<P>`; with no listener there, the guest gets a RST.
//!
//! The muxer owns the connection table (keyed by host port and guest port), the handshakes of
//! host clients that have not sent their `CONNECT` line, and the queue of connections that have
//! something for the guest. It never touches epoll directly while handling an event:
//! [`Muxer::sync_epoll`] applies the interest every stream wants afterwards, so freed streams
//! are unregistered before they are closed.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::OsString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events};
use vm_memory::VolatileSlice;
use vm_memory::bitmap::BitmapSlice;
use vmm_sys_util::timerfd::TimerFd;

use super::connection::Connection;
use super::host_connect::connect_nonblocking;
use super::packet::{HOST_CID, Header, TYPE_STREAM, op};
use crate::devices::virtio::ratelimit::{guest_debug, guest_warn};

/// Most connections (plus pending handshakes) per VM; more are refused.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most queued RSTs for packets without a connection; more are dropped.
const MAX_CONTROL_PACKETS: usize = 1024;
/// Longest accepted `CONNECT <port>\n` line.
const MAX_CONNECT_LINE: usize = 32;
/// Time a host client has to send its `CONNECT` line, and the guest has to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often pending handshakes are checked for expiry while there are any.
const SWEEP_INTERVAL: Duration = Duration::from_millis(500);
/// First host port handed out to host-initiated connections (above any well-known port).
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// (host port, guest port).
type ConnKey = (u32, u32);

/// Why the host socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MuxerError {
    /// Something other than a stale socket is in the way.
    #[error("{path} exists and is not a socket")]
    PathInUse { path: PathBuf },
    /// Removing a stale socket failed.
    #[error("cannot remove stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Binding the listener failed.
    #[error("cannot listen on {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The sweep timer could not be created.
    #[error("cannot create the vsock timer")]
    Timer(#[source] vmm_sys_util::errno::Error),
}

/// A host client that has not sent its `CONNECT` line yet.
#[derive(Debug)]
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

/// Host-side connection multiplexer.
#[derive(Debug)]
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, Connection>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    /// RSTs for packets that have no connection.
    control: VecDeque<Header>,
    /// Connections that may have a packet for the guest, in service order.
    rx_queue: VecDeque<ConnKey>,
    rx_queued: HashSet<ConnKey>,
    /// Current epoll registrations of streams.
    registered: HashMap<RawFd, EventSet>,
    /// Streams freed since the last `sync_epoll`, kept open until unregistered.
    doomed: Vec<UnixStream>,
    next_local_port: u32,
}

impl Muxer {
    /// Listens on `uds_path` (replacing a stale socket left by a killed VMM).
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, MuxerError> {
        remove_stale_socket(uds_path)?;
        let listener = UnixListener::bind(uds_path).map_err(|source| MuxerError::Bind {
            path: uds_path.to_owned(),
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|source| MuxerError::Bind {
                path: uds_path.to_owned(),
                source,
            })?;
        Ok(Self {
            guest_cid,
            uds_path: uds_path.to_owned(),
            listener,
            timer: TimerFd::new().map_err(MuxerError::Timer)?,
            timer_armed: false,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            control: VecDeque::new(),
            rx_queue: VecDeque::new(),
            rx_queued: HashSet::new(),
            registered: HashMap::new(),
            doomed: Vec::new(),
            next_local_port: FIRST_LOCAL_PORT,
        })
    }

    /// Live connections (established or waiting for the guest).
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// Host clients still to send their `CONNECT` line.
    pub fn handshake_count(&self) -> usize {
        self.handshakes.len()
    }

    /// Registers the listener and the sweep timer.
    pub fn init(&self, ops: &mut EventOps) {
        for (fd, what) in [
            (self.listener.as_raw_fd(), "listener"),
            (self.timer.as_raw_fd(), "timer"),
        ] {
            if let Err(err) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                tracing::error!(%err, what, "vsock: cannot register with the event loop");
            }
        }
    }

    /// Handles an epoll event on one of the muxer's fds; false if `fd` is not the muxer's.
    pub fn handle_event(&mut self, fd: RawFd, events: EventSet) -> bool {
        if fd == self.listener.as_raw_fd() {
            self.accept_clients();
        } else if fd == self.timer.as_raw_fd() {
            // The count of expirations is irrelevant.
            let _ = self.timer.wait();
            self.sweep(Instant::now());
        } else if self.handshakes.contains_key(&fd) {
            self.read_handshake(fd);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            if let Some(conn) = self.conns.get_mut(&key) {
                if events.intersects(
                    EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP,
                ) {
                    conn.on_host_readable();
                }
                if events.contains(EventSet::OUT) {
                    conn.on_host_writable();
                }
            }
            self.after_change(key);
        } else {
            return false;
        }
        true
    }

    /// Handles a packet from the guest's tx queue.
    pub fn on_guest_packet<B: BitmapSlice>(
        &mut self,
        hdr: &Header,
        data: Option<&VolatileSlice<'_, B>>,
    ) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            guest_warn!(
                src_cid = hdr.src_cid,
                dst_cid = hdr.dst_cid,
                "vsock: dropping a packet with foreign addresses"
            );
            return;
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != op::RST {
                self.push_control(Header::rst_reply(hdr));
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.on_guest_packet(hdr, data);
            self.after_change(key);
            return;
        }
        match hdr.op {
            op::REQUEST => self.connect_to_host(hdr),
            op::RST => {}
            _ => self.push_control(Header::rst_reply(hdr)),
        }
    }

    /// Whether a packet for the guest may be ready.
    pub fn has_rx(&self) -> bool {
        !self.control.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest; payload is read into `data`. `None`: nothing after all.
    pub fn fill_rx<B: BitmapSlice>(
        &mut self,
        data: Option<&VolatileSlice<'_, B>>,
    ) -> Option<(Header, usize)> {
        if let Some(hdr) = self.control.pop_front() {
            return Some((hdr, 0));
        }
        // Each queued connection gets one try: one that still has something but could not
        // produce it (e.g. the rx buffer has no payload area) is requeued for the next round
        // instead of being retried forever here.
        for _ in 0..self.rx_queue.len() {
            let Some(key) = self.rx_queue.pop_front() else {
                break;
            };
            self.rx_queued.remove(&key);
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            let packet = conn.fill_rx(data);
            self.after_change(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// Drops every connection and handshake (device reset). The listener stays.
    pub fn reset(&mut self) {
        for (_, conn) in self.conns.drain() {
            self.doomed.push(conn.into_stream());
        }
        for (_, handshake) in self.handshakes.drain() {
            self.doomed.push(handshake.stream);
        }
        self.by_fd.clear();
        self.control.clear();
        self.rx_queue.clear();
        self.rx_queued.clear();
    }

    /// Brings epoll registrations in line with what each stream wants; unregisters and closes
    /// freed streams; arms the sweep timer while anything can expire.
    pub fn sync_epoll(&mut self, ops: &mut EventOps) {
        for stream in self.doomed.drain(..) {
            if self.registered.remove(&stream.as_raw_fd()).is_some()
                && let Err(err) = ops.remove(Events::empty(&stream))
            {
                tracing::warn!(%err, "vsock: cannot unregister a closed stream");
            }
        }
        let wanted: Vec<(RawFd, EventSet)> = self
            .handshakes
            .keys()
            .map(|&fd| (fd, EventSet::IN))
            .chain(
                self.conns
                    .values()
                    .map(|c| (c.stream().as_raw_fd(), c.interest())),
            )
            .collect();
        for (fd, want) in wanted {
            let have = self.registered.get(&fd).copied();
            let result = match (have, want.is_empty()) {
                (None, true) => continue,
                (None, false) => ops.add(Events::new_raw(fd, want)),
                (Some(_), true) => ops.remove(Events::empty_raw(fd)),
                (Some(have), false) if have == want => continue,
                (Some(_), false) => ops.modify(Events::new_raw(fd, want)),
            };
            match result {
                Ok(()) if want.is_empty() => {
                    self.registered.remove(&fd);
                }
                Ok(()) => {
                    self.registered.insert(fd, want);
                }
                Err(err) => tracing::warn!(%err, fd, "vsock: epoll update failed"),
            }
        }
        self.arm_timer();
    }

    fn arm_timer(&mut self) {
        let needed =
            !self.handshakes.is_empty() || self.conns.values().any(Connection::has_deadline);
        if needed == self.timer_armed {
            return;
        }
        let result = if needed {
            self.timer.reset(SWEEP_INTERVAL, Some(SWEEP_INTERVAL))
        } else {
            self.timer.clear()
        };
        match result {
            Ok(()) => self.timer_armed = needed,
            Err(err) => tracing::error!(%err, "vsock: cannot (dis)arm the sweep timer"),
        }
    }

    /// Expires handshakes and unanswered host-initiated connections.
    fn sweep(&mut self, now: Instant) {
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| now >= h.deadline)
            .map(|(&fd, _)| fd)
            .collect();
        for fd in expired {
            tracing::debug!("vsock: host client sent no CONNECT line in time");
            self.drop_handshake(fd);
        }
        let expired: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.is_expired(now))
            .map(|(&k, _)| k)
            .collect();
        for key in expired {
            tracing::debug!(
                host_port = key.0,
                guest_port = key.1,
                "vsock: connection timed out (guest did not accept, or host did not drain)"
            );
            if let Some(conn) = self.conns.get_mut(&key) {
                conn.reset();
            }
            self.after_change(key);
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                        tracing::warn!("vsock: too many connections; refusing a host client");
                        continue;
                    }
                    if let Err(err) = stream.set_nonblocking(true) {
                        tracing::warn!(%err, "vsock: cannot make a host client non-blocking");
                        continue;
                    }
                    self.handshakes.insert(
                        stream.as_raw_fd(),
                        Handshake {
                            stream,
                            line: Vec::with_capacity(MAX_CONNECT_LINE),
                            deadline: Instant::now() + CONNECT_TIMEOUT,
                        },
                    );
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    tracing::warn!(%err, "vsock: accept failed");
                    break;
                }
            }
        }
    }

    /// Reads the `CONNECT <port>\n` line a byte at a time, so no data behind it is consumed.
    fn read_handshake(&mut self, fd: RawFd) {
        let Some(handshake) = self.handshakes.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        let port = loop {
            match handshake.stream.read(&mut byte) {
                Ok(0) => break Err("closed before the CONNECT line"),
                Ok(_) if byte[0] == b'\n' => break parse_connect_line(&handshake.line),
                Ok(_) if handshake.line.len() >= MAX_CONNECT_LINE => {
                    break Err("CONNECT line too long");
                }
                Ok(_) => handshake.line.push(byte[0]),
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => return,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => break Err("read error"),
            }
        };
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        match port {
            Ok(peer_port) => self.connect_to_guest(handshake.stream, peer_port),
            Err(why) => {
                tracing::debug!(why, "vsock: dropping a host client");
                self.doomed.push(handshake.stream);
            }
        }
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if let Some(handshake) = self.handshakes.remove(&fd) {
            self.doomed.push(handshake.stream);
        }
    }

    /// Starts a host-initiated connection to guest port `peer_port`.
    fn connect_to_guest(&mut self, stream: UnixStream, peer_port: u32) {
        let mut local_port = self.next_local_port;
        while self.conns.contains_key(&(local_port, peer_port)) {
            local_port = next_port(local_port);
        }
        self.next_local_port = next_port(local_port);
        let conn = Connection::host_initiated(
            stream,
            self.guest_cid,
            local_port,
            peer_port,
            Instant::now() + CONNECT_TIMEOUT,
        );
        self.insert(conn);
    }

    /// Serves a guest REQUEST by connecting to the host listener for its port.
    fn connect_to_host(&mut self, request: &Header) {
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            guest_warn!("vsock: too many connections; refusing a guest request");
            self.push_control(Header::rst_reply(request));
            return;
        }
        let path = host_listener_path(&self.uds_path, request.dst_port);
        let stream = match connect_nonblocking(&path) {
            Ok(stream) => stream,
            Err(err) => {
                guest_debug!(
                    %err,
                    port = request.dst_port,
                    "vsock: host listener missing or busy; refusing"
                );
                self.push_control(Header::rst_reply(request));
                return;
            }
        };
        self.insert(Connection::guest_initiated(stream, request));
    }

    fn insert(&mut self, conn: Connection) {
        let key = (conn.local_port(), conn.peer_port());
        self.by_fd.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, conn);
        self.after_change(key);
    }

    /// Frees a closed connection, or queues it for rx if it has something for the guest.
    fn after_change(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get(&key) else {
            return;
        };
        if conn.is_closed() {
            if let Some(conn) = self.conns.remove(&key) {
                self.by_fd.remove(&conn.stream().as_raw_fd());
                self.doomed.push(conn.into_stream());
            }
        } else if conn.has_rx() && self.rx_queued.insert(key) {
            self.rx_queue.push_back(key);
        }
    }

    fn push_control(&mut self, hdr: Header) {
        if self.control.len() >= MAX_CONTROL_PACKETS {
            guest_warn!("vsock: control queue full; dropping a RST");
            return;
        }
        self.control.push_back(hdr);
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        if let Err(err) = std::fs::remove_file(&self.uds_path) {
            tracing::warn!(%err, path = %self.uds_path.display(), "vsock: cannot remove the socket");
        }
    }
}

fn next_port(port: u32) -> u32 {
    match port.checked_add(1) {
        Some(p) if p < u32::MAX => p,
        _ => FIRST_LOCAL_PORT,
    }
}

/// `<uds_path>_<port>`.
pub fn host_listener_path(uds_path: &Path, port: u32) -> PathBuf {
    let mut path = OsString::from(uds_path.as_os_str());
    path.push(format!("_{port}"));
    PathBuf::from(path)
}

fn parse_connect_line(line: &[u8]) -> Result<u32, &'static str> {
    let line = std::str::from_utf8(line).map_err(|_| "CONNECT line is not UTF-8")?;
    let line = line.strip_suffix('\r').unwrap_or(line);
    let port = line
        .strip_prefix("CONNECT ")
        .ok_or("expected `CONNECT <port>`")?;
    port.trim()
        .parse()
        .map_err(|_| "invalid port in CONNECT line")
}

fn remove_stale_socket(path: &Path) -> Result<(), MuxerError> {
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| MuxerError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Ok(_) => Err(MuxerError::PathInUse {
            path: path.to_owned(),
        }),
        Err(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect_line(b"CONNECT 52\r"), Ok(52));
        assert!(parse_connect_line(b"CONNECT").is_err());
        assert!(parse_connect_line(b"CONNECT -1").is_err());
        assert!(parse_connect_line(b"CONNECT 99999999999").is_err());
        assert!(parse_connect_line(b"connect 5").is_err());
        assert!(parse_connect_line(&[0xff, 0xfe]).is_err());
    }

    #[test]
    fn listener_paths_and_port_wrap() {
        assert_eq!(
            host_listener_path(Path::new("/run/vm/v.sock"), 52),
            PathBuf::from("/run/vm/v.sock_52")
        );
        assert_eq!(next_port(FIRST_LOCAL_PORT), FIRST_LOCAL_PORT + 1);
        assert_eq!(next_port(u32::MAX - 1), FIRST_LOCAL_PORT);
    }

    #[test]
    fn stale_sockets_are_replaced_but_other_files_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sock");
        drop(UnixListener::bind(&path).unwrap());
        let muxer = Muxer::new(3, &path).unwrap();
        assert!(path.exists());
        drop(muxer);
        assert!(!path.exists(), "socket removed on drop");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            Muxer::new(3, &path),
            Err(MuxerError::PathInUse { .. })
        ));
    }
}
