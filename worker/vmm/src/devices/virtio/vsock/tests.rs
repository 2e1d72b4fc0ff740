//! Device-level vsock tests: a driver-side guest on mock split queues in real guest memory, the
//! device on a real event loop, and real Unix sockets on the host side.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::connection::CONN_BUF_SIZE;
use super::muxer::host_listener_path;
use super::packet::{HOST_CID, Header, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM, op};
use super::{Vsock, VsockConfig, VsockError};
use crate::devices::virtio::device::VirtioDevice;
use crate::devices::virtio::test_utils::{
    GuestQueue, TestEventManager, activation, event_loop, guest_memory, ro, run_until, wo,
};

const GUEST_CID: u64 = 3;
const HDR_LEN: u32 = 44;
const RX_DATA_LEN: u32 = 4096;
const TX_DATA_MAX: usize = 16 * 1024;
/// Receive buffer the test guest advertises.
const GUEST_BUF_ALLOC: u32 = 64 * 1024;

fn encode(hdr: &Header) -> [u8; 44] {
    let mut b = [0u8; 44];
    b[0..8].copy_from_slice(&hdr.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&hdr.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&hdr.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&hdr.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&hdr.len.to_le_bytes());
    b[28..30].copy_from_slice(&hdr.type_.to_le_bytes());
    b[30..32].copy_from_slice(&hdr.op.to_le_bytes());
    b[32..36].copy_from_slice(&hdr.flags.to_le_bytes());
    b[36..40].copy_from_slice(&hdr.buf_alloc.to_le_bytes());
    b[40..44].copy_from_slice(&hdr.fwd_cnt.to_le_bytes());
    b
}

fn decode(b: &[u8; 44]) -> Header {
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
    let u16_at = |i: usize| u16::from_le_bytes(b[i..i + 2].try_into().unwrap());
    Header {
        src_cid: u64_at(0),
        dst_cid: u64_at(8),
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        type_: u16_at(28),
        op: u16_at(30),
        flags: u32_at(32),
        buf_alloc: u32_at(36),
        fwd_cnt: u32_at(40),
    }
}

/// The guest driver: rx and tx queues, buffer placement and the bytes it has consumed.
struct Guest<'a> {
    mem: &'a GuestMemoryMmap,
    rx: GuestQueue<'a>,
    tx: GuestQueue<'a>,
    rx_kick: EventFd,
    tx_kick: EventFd,
    rx_seen: u16,
    tx_fwd_cnt: u32,
}

impl<'a> Guest<'a> {
    fn header(&self, op: u16, src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: GUEST_BUF_ALLOC,
            fwd_cnt: self.tx_fwd_cnt,
        }
    }

    /// Queues one packet on tx and kicks.
    fn send(&mut self, mut hdr: Header, data: &[u8]) {
        assert!(data.len() <= TX_DATA_MAX);
        hdr.len = u32::try_from(data.len()).unwrap();
        let mem = self.mem;
        let n = if data.is_empty() { 1 } else { 2 };
        self.tx.add_chain_with(n, |head| {
            let hdr_addr = 0x40_0000 + u64::from(head) * 0x100;
            let data_addr = 0x50_0000 + u64::from(head) * 0x4000;
            mem.write_slice(&encode(&hdr), GuestAddress(hdr_addr))
                .unwrap();
            mem.write_slice(data, GuestAddress(data_addr)).unwrap();
            let mut bufs = vec![ro(hdr_addr, HDR_LEN)];
            if !data.is_empty() {
                bufs.push(ro(data_addr, hdr.len));
            }
            bufs
        });
        self.tx_kick.write(1).unwrap();
    }

    /// Offers `n` rx buffers and kicks.
    fn offer_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.rx.add_chain_with(2, |head| {
                vec![
                    wo(0x10_0000 + u64::from(head) * 0x100, HDR_LEN),
                    wo(0x20_0000 + u64::from(head) * 0x1000, RX_DATA_LEN),
                ]
            });
        }
        self.rx_kick.write(1).unwrap();
    }

    fn rx_pending(&self) -> bool {
        self.rx.used_count() != self.rx_seen
    }

    /// Takes the next packet the device put in the rx queue.
    fn recv(&mut self) -> (Header, Vec<u8>) {
        assert!(self.rx_pending(), "no rx packet");
        let (head, len) = self.rx.used(self.rx_seen);
        self.rx_seen = self.rx_seen.wrapping_add(1);
        let head = u64::from(head);
        let mut raw = [0u8; 44];
        self.mem
            .read_slice(&mut raw, GuestAddress(0x10_0000 + head * 0x100))
            .unwrap();
        let hdr = decode(&raw);
        assert_eq!(len, HDR_LEN + hdr.len, "used length matches the header");
        let mut data = vec![0u8; hdr.len as usize];
        self.mem
            .read_slice(&mut data, GuestAddress(0x20_0000 + head * 0x1000))
            .unwrap();
        (hdr, data)
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    uds_path: std::path::PathBuf,
    vsock: Arc<Mutex<Vsock>>,
    manager: TestEventManager,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let uds_path = dir.path().join("vm.vsock");
    let vsock = super::super::vsock(VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: uds_path.clone(),
    })
    .unwrap();
    let manager = event_loop(vsock.clone());
    Fixture {
        _dir: dir,
        uds_path,
        vsock,
        manager,
    }
}

/// Activates the device with fresh queues and returns the guest driving them.
fn start<'a>(f: &mut Fixture, mem: &'a GuestMemoryMmap) -> Guest<'a> {
    let rx = GuestQueue::new(mem, 0, 256);
    let tx = GuestQueue::new(mem, 0x1_0000, 256);
    let ev = GuestQueue::new(mem, 0x2_0000, 256);
    let (act, _irq) = activation(mem, vec![rx.queue(), tx.queue(), ev.queue()]);
    let rx_kick = act.queue_evts[0].try_clone().unwrap();
    let tx_kick = act.queue_evts[1].try_clone().unwrap();
    f.vsock.lock().unwrap().activate(act).unwrap();
    f.manager.run_with_timeout(10).unwrap();
    Guest {
        mem,
        rx,
        tx,
        rx_kick,
        tx_kick,
        rx_seen: 0,
        tx_fwd_cnt: 0,
    }
}

fn recv_op(f: &mut Fixture, guest: &mut Guest<'_>, what: &str) -> (Header, Vec<u8>) {
    run_until(&mut f.manager, what, || guest.rx_pending());
    guest.recv()
}

fn connections(f: &Fixture) -> usize {
    f.vsock.lock().unwrap().muxer().connection_count()
}

fn host_stream(stream: UnixStream) -> UnixStream {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

#[test]
fn invalid_cids_and_config_space() {
    let dir = tempfile::tempdir().unwrap();
    for cid in [0, 1, 2, u64::from(u32::MAX)] {
        let err = Vsock::new(VsockConfig {
            guest_cid: cid,
            uds_path: dir.path().join("x.sock"),
        })
        .unwrap_err();
        assert!(matches!(err, VsockError::InvalidCid(_)), "{err}");
    }
    let f = fixture();
    let mut cid = [0u8; 8];
    f.vsock.lock().unwrap().read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), GUEST_CID);
    assert_eq!(f.vsock.lock().unwrap().queue_max_sizes().len(), 3);
}

#[test]
fn guest_connects_to_a_host_listener_and_data_flows_both_ways() {
    let mut f = fixture();
    let listener = UnixListener::bind(host_listener_path(&f.uds_path, 52)).unwrap();
    let mem = guest_memory();
    let mut guest = start(&mut f, &mem);
    guest.offer_rx(16);

    let request = guest.header(op::REQUEST, 1000, 52);
    guest.send(request, &[]);
    let (hdr, _) = recv_op(&mut f, &mut guest, "RESPONSE");
    assert_eq!(hdr.op, op::RESPONSE);
    assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((hdr.src_port, hdr.dst_port), (52, 1000));
    assert_eq!(hdr.buf_alloc, CONN_BUF_SIZE);
    let (host, _) = listener.accept().unwrap();
    let mut host = host_stream(host);

    guest.send(guest.header(op::RW, 1000, 52), b"ping");
    f.manager.run_with_timeout(10).unwrap();
    let mut got = [0u8; 4];
    host.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");

    host.write_all(b"pong").unwrap();
    let (hdr, data) = recv_op(&mut f, &mut guest, "RW from host");
    assert_eq!((hdr.op, data.as_slice()), (op::RW, &b"pong"[..]));
    assert_eq!(hdr.fwd_cnt, 4, "our fwd_cnt counts the forwarded ping");

    // The guest closes: SHUTDOWN(both) is answered with RST and the connection is freed.
    let mut shutdown = guest.header(op::SHUTDOWN, 1000, 52);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    guest.send(shutdown, &[]);
    let (hdr, _) = recv_op(&mut f, &mut guest, "RST");
    assert_eq!(hdr.op, op::RST);
    assert_eq!(connections(&f), 0);
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "host stream closed");
}

#[test]
fn guest_connection_to_a_port_without_listener_is_reset() {
    let mut f = fixture();
    let mem = guest_memory();
    let mut guest = start(&mut f, &mem);
    guest.offer_rx(4);
    guest.send(guest.header(op::REQUEST, 1000, 99), &[]);
    let (hdr, _) = recv_op(&mut f, &mut guest, "RST for port 99");
    assert_eq!(hdr.op, op::RST);
    assert_eq!((hdr.src_port, hdr.dst_port), (99, 1000));
    // Packets for unknown connections are reset too; RSTs are not answered.
    guest.send(guest.header(op::RW, 1000, 98), b"x");
    let (hdr, _) = recv_op(&mut f, &mut guest, "RST for stray data");
    assert_eq!(hdr.op, op::RST);
    guest.send(guest.header(op::RST, 1000, 97), &[]);
    f.manager.run_with_timeout(20).unwrap();
    assert!(!guest.rx_pending());
    assert_eq!(connections(&f), 0);
}

#[test]
fn packets_with_foreign_cids_are_dropped() {
    let mut f = fixture();
    let mem = guest_memory();
    let mut guest = start(&mut f, &mem);
    guest.offer_rx(4);
    let mut spoofed = guest.header(op::REQUEST, 1000, 52);
    spoofed.src_cid = 7;
    guest.send(spoofed, &[]);
    f.manager.run_with_timeout(20).unwrap();
    assert!(!guest.rx_pending(), "no answer to a spoofed source");
    assert_eq!(guest.tx.used_count(), 1, "the buffer is still returned");
}

/// Connects a host client and completes the handshake; returns it and the host port.
fn host_connect(f: &mut Fixture, guest: &mut Guest<'_>, guest_port: u32) -> (UnixStream, u32) {
    let mut client = host_stream(UnixStream::connect(&f.uds_path).unwrap());
    client
        .write_all(format!("CONNECT {guest_port}\n").as_bytes())
        .unwrap();
    let (hdr, _) = recv_op(f, guest, "REQUEST to the guest");
    assert_eq!(hdr.op, op::REQUEST);
    assert_eq!(hdr.dst_port, guest_port);
    assert!(hdr.src_port >= 1 << 30);
    let host_port = hdr.src_port;
    guest.send(guest.header(op::RESPONSE, guest_port, host_port), &[]);
    f.manager.run_with_timeout(10).unwrap();
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while byte[0] != b'\n' {
        client.read_exact(&mut byte).unwrap();
        line.push(byte[0]);
    }
    assert_eq!(
        String::from_utf8(line).unwrap(),
        format!("OK {host_port}\n")
    );
    (client, host_port)
}

#[test]
fn host_connects_to_the_guest_and_bulk_data_flows_with_credit_updates() {
    let mut f = fixture();
    let mem = guest_memory();
    let mut guest = start(&mut f, &mem);
    guest.offer_rx(8);
    let (client, host_port) = host_connect(&mut f, &mut guest, 1024);
    assert_eq!(connections(&f), 1);

    // Host → guest: 200 KiB, more than the guest's 64 KiB window, so the device must wait for
    // the guest's credit updates.
    let payload: Vec<u8> = (0..200 * 1024u32).map(|i| (i % 251) as u8).collect();
    let writer = {
        let mut client = client.try_clone().unwrap();
        let payload = payload.clone();
        std::thread::spawn(move || client.write_all(&payload).unwrap())
    };
    let mut received = Vec::new();
    let mut in_window = 0u32;
    while received.len() < payload.len() {
        let (hdr, data) = recv_op(&mut f, &mut guest, "host data");
        match hdr.op {
            op::RW => {
                in_window += hdr.len;
                assert!(
                    in_window <= GUEST_BUF_ALLOC,
                    "device exceeded the guest's credit"
                );
                received.extend_from_slice(&data);
            }
            op::CREDIT_REQUEST => {}
            other => panic!("unexpected op {other}"),
        }
        // The guest application consumed everything: report it and offer the buffer again.
        guest.tx_fwd_cnt = u32::try_from(received.len()).unwrap();
        in_window = 0;
        guest.send(guest.header(op::CREDIT_UPDATE, 1024, host_port), &[]);
        guest.offer_rx(1);
    }
    writer.join().unwrap();
    assert_eq!(received, payload);

    // Guest → host: 320 KiB, more than our 256 KiB window, respecting our credit.
    let reader = {
        let mut client = client.try_clone().unwrap();
        std::thread::spawn(move || {
            let mut got = vec![0u8; 320 * 1024];
            client.read_exact(&mut got).unwrap();
            got
        })
    };
    let data: Vec<u8> = (0..320 * 1024u32).map(|i| (i % 13) as u8).collect();
    let mut sent = 0usize;
    let mut host_fwd_cnt = 0u32;
    let mut credit_updates = 0;
    while sent < data.len() {
        while guest.rx_pending() {
            let (hdr, _) = guest.recv();
            if hdr.op == op::CREDIT_UPDATE {
                credit_updates += 1;
            }
            host_fwd_cnt = hdr.fwd_cnt;
            guest.offer_rx(1);
        }
        let in_flight = u32::try_from(sent).unwrap() - host_fwd_cnt;
        let credit = (CONN_BUF_SIZE - in_flight) as usize;
        if credit == 0 {
            f.manager.run_with_timeout(10).unwrap();
            continue;
        }
        let n = credit.min(TX_DATA_MAX).min(data.len() - sent);
        guest.send(guest.header(op::RW, 1024, host_port), &data[sent..sent + n]);
        sent += n;
        f.manager.run_with_timeout(1).unwrap();
    }
    // Data the host stream could not take at once is still queued in the device.
    run_until(&mut f.manager, "host received everything", || {
        reader.is_finished()
    });
    assert_eq!(reader.join().unwrap(), data);
    assert!(credit_updates > 0, "the device reported forwarded bytes");
    assert_eq!(connections(&f), 1, "never reset");
}

#[test]
fn guest_refusal_closes_the_host_client() {
    let mut f = fixture();
    let mem = guest_memory();
    let mut guest = start(&mut f, &mem);
    guest.offer_rx(4);
    let mut client = host_stream(UnixStream::connect(&f.uds_path).unwrap());
    client.write_all(b"CONNECT 7777\n").unwrap();
    let (hdr, _) = recv_op(&mut f, &mut guest, "REQUEST");
    guest.send(guest.header(op::RST, 7777, hdr.src_port), &[]);
    f.manager.run_with_timeout(10).unwrap();
    let mut buf = Vec::new();
    client.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty(), "closed without OK");
    assert_eq!(connections(&f), 0);
}

#[test]
fn bad_connect_lines_close_the_client() {
    let mut f = fixture();
    for line in [&b"HELLO\n"[..], b"CONNECT abc\n", &[b'x'; 100]] {
        let mut client = host_stream(UnixStream::connect(&f.uds_path).unwrap());
        client.write_all(line).unwrap();
        let mut buf = Vec::new();
        let manager = &mut f.manager;
        let reader = std::thread::spawn(move || match client.read_to_end(&mut buf) {
            Ok(_) => buf.is_empty(),
            // Closing a socket with unread input (the over-long line) resets it.
            Err(err) => err.kind() == std::io::ErrorKind::ConnectionReset,
        });
        run_until(manager, "client closed", || reader.is_finished());
        assert!(
            reader.join().unwrap(),
            "client got data or an unexpected error"
        );
    }
    assert_eq!(f.vsock.lock().unwrap().muxer().handshake_count(), 0);
}

#[test]
fn silent_host_client_times_out() {
    let mut f = fixture();
    let mut client = host_stream(UnixStream::connect(&f.uds_path).unwrap());
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).map(|_| buf)
    });
    // CONNECT_TIMEOUT is 5 s; allow ~8 s.
    for _ in 0..80 {
        if reader.is_finished() {
            break;
        }
        f.manager.run_with_timeout(100).unwrap();
    }
    assert!(reader.is_finished(), "silent client was not dropped");
    assert!(reader.join().unwrap().unwrap().is_empty());
}

#[test]
fn reset_and_drop_free_connections_and_the_socket_file() {
    let mut f = fixture();
    let _listener = UnixListener::bind(host_listener_path(&f.uds_path, 52)).unwrap();
    let mem = guest_memory();
    let mut guest = start(&mut f, &mem);
    guest.offer_rx(8);
    let (mut client, _) = host_connect(&mut f, &mut guest, 1024);
    assert_eq!(connections(&f), 1);

    f.vsock.lock().unwrap().reset();
    f.manager.run_with_timeout(10).unwrap();
    assert_eq!(connections(&f), 0);
    let mut buf = Vec::new();
    client.read_to_end(&mut buf).unwrap();
    assert!(buf.is_empty(), "host client sees EOF after device reset");

    // After a reset the device can be activated again and still works.
    let mem2 = guest_memory();
    let mut guest = start(&mut f, &mem2);
    guest.offer_rx(4);
    guest.send(guest.header(op::REQUEST, 1001, 52), &[]);
    let (hdr, _) = recv_op(&mut f, &mut guest, "RESPONSE after re-activation");
    assert_eq!(hdr.op, op::RESPONSE);
    let state = f.vsock.lock().unwrap().state();
    assert_eq!(state.connections, 1);
    assert_eq!(state.guest_cid, GUEST_CID);
    assert_eq!(state.virtio.queues.len(), 3);
    assert!(state.virtio.activated);

    let uds_path = f.uds_path.clone();
    assert!(uds_path.exists());
    drop(f.manager);
    drop(f.vsock);
    assert!(
        !uds_path.exists(),
        "socket file removed when the device is dropped"
    );
}

#[test]
fn rx_buffers_without_payload_room_do_not_stall_the_loop() {
    let mut f = fixture();
    let listener = UnixListener::bind(host_listener_path(&f.uds_path, 52)).unwrap();
    let mem = guest_memory();
    let mut guest = start(&mut f, &mem);
    guest.offer_rx(1);
    guest.send(guest.header(op::REQUEST, 1000, 52), &[]);
    let (hdr, _) = recv_op(&mut f, &mut guest, "RESPONSE");
    assert_eq!(hdr.op, op::RESPONSE);
    let (mut host, _) = listener.accept().unwrap();
    host.write_all(b"data").unwrap();
    // A header-only rx buffer is malformed: returned unused, and the loop goes on.
    guest.rx.add_chain(&[wo(0x10_0000, HDR_LEN)]);
    guest.rx_kick.write(1).unwrap();
    run_until(&mut f.manager, "malformed buffer returned", || {
        guest.rx_pending()
    });
    let (head, len) = guest.rx.used(guest.rx_seen);
    guest.rx_seen += 1;
    assert_eq!(len, 0, "buffer {head} returned empty");
    guest.offer_rx(1);
    let (hdr, data) = recv_op(&mut f, &mut guest, "data after a malformed buffer");
    assert_eq!((hdr.op, data.as_slice()), (op::RW, &b"data"[..]));
}
