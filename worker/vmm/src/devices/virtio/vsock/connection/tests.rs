//! State-machine tests with a real Unix stream pair as the host side.

use std::io::Read;
use std::time::Duration;

use super::*;

const GUEST_CID: u64 = 3;
const HOST_PORT: u32 = 1234;
const GUEST_PORT: u32 = 5555;

fn guest_header(op: u16, buf_alloc: u32, fwd_cnt: u32) -> Header {
    Header {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: GUEST_PORT,
        dst_port: HOST_PORT,
        len: 0,
        type_: TYPE_STREAM,
        op,
        flags: 0,
        buf_alloc,
        fwd_cnt,
    }
}

fn pair() -> (UnixStream, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    theirs
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    (ours, theirs)
}

/// An established guest-initiated connection (RESPONSE already taken) and the host peer.
fn established(buf_alloc: u32) -> (Connection, UnixStream) {
    let (ours, theirs) = pair();
    let mut conn = Connection::guest_initiated(ours, &guest_header(op::REQUEST, buf_alloc, 0));
    let (hdr, len) = conn.fill_rx::<()>(None).unwrap();
    assert_eq!((hdr.op, len), (op::RESPONSE, 0));
    (conn, theirs)
}

fn send_rw(conn: &mut Connection, bytes: &mut [u8], fwd_cnt: u32) {
    let mut hdr = guest_header(op::RW, 64 * 1024, fwd_cnt);
    hdr.len = u32::try_from(bytes.len()).unwrap();
    let slice = VolatileSlice::from(bytes);
    conn.on_guest_packet(&hdr, Some(&slice));
}

/// Takes one rx packet with up to `room` payload bytes; returns the header and payload.
fn take_rx(conn: &mut Connection, room: usize) -> Option<(Header, Vec<u8>)> {
    let mut buf = vec![0u8; room];
    let slice = VolatileSlice::from(&mut buf[..]);
    let (hdr, len) = conn.fill_rx(Some(&slice))?;
    buf.truncate(len);
    Some((hdr, buf))
}

#[test]
fn guest_initiated_connection_answers_with_response_and_our_credit() {
    let (ours, _theirs) = pair();
    let mut conn = Connection::guest_initiated(ours, &guest_header(op::REQUEST, 4096, 0));
    assert!(conn.has_rx());
    let (hdr, _) = conn.fill_rx::<()>(None).unwrap();
    assert_eq!(hdr.op, op::RESPONSE);
    assert_eq!((hdr.src_cid, hdr.dst_cid), (HOST_CID, GUEST_CID));
    assert_eq!((hdr.src_port, hdr.dst_port), (HOST_PORT, GUEST_PORT));
    assert_eq!(hdr.buf_alloc, CONN_BUF_SIZE);
    assert_eq!(conn.state(), ConnState::Established);
    assert_eq!(conn.peer_credit(), 4096);
    assert!(conn.interest().contains(EventSet::IN));
}

#[test]
fn host_initiated_connection_sends_request_then_ok_line_on_response() {
    let (ours, mut theirs) = pair();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut conn = Connection::host_initiated(ours, GUEST_CID, HOST_PORT, GUEST_PORT, deadline);
    let (hdr, _) = conn.fill_rx::<()>(None).unwrap();
    assert_eq!(hdr.op, op::REQUEST);
    assert_eq!(
        conn.interest(),
        EventSet::empty(),
        "no host input before the guest accepts"
    );
    conn.on_guest_packet::<()>(&guest_header(op::RESPONSE, 4096, 0), None);
    assert_eq!(conn.state(), ConnState::Established);
    let mut line = [0u8; 8];
    theirs.read_exact(&mut line[..8]).unwrap();
    assert_eq!(&line, b"OK 1234\n");
    assert!(!conn.is_expired(Instant::now() + Duration::from_secs(60)));
}

#[test]
fn unanswered_host_request_expires_and_refusal_closes() {
    let (ours, mut theirs) = pair();
    let deadline = Instant::now();
    let mut conn = Connection::host_initiated(ours, GUEST_CID, HOST_PORT, GUEST_PORT, deadline);
    assert!(conn.is_expired(Instant::now()));
    conn.fill_rx::<()>(None).unwrap();
    conn.on_guest_packet::<()>(&guest_header(op::RST, 0, 0), None);
    assert!(conn.is_closed());
    drop(conn);
    let mut buf = [0u8; 1];
    assert_eq!(theirs.read(&mut buf).unwrap(), 0, "host client sees EOF");
}

#[test]
fn guest_data_reaches_the_host_and_credit_is_reported() {
    let (mut conn, mut theirs) = established(64 * 1024);
    let mut chunk = vec![7u8; 32 * 1024];
    send_rw(&mut conn, &mut chunk, 0);
    let mut got = vec![0u8; 32 * 1024];
    theirs.read_exact(&mut got).unwrap();
    assert_eq!(got, chunk);
    assert!(!conn.has_rx(), "below the credit-update threshold");
    // Past a quarter of the buffer, an unsolicited CREDIT_UPDATE is due.
    send_rw(&mut conn, &mut chunk, 0);
    theirs.read_exact(&mut got).unwrap();
    let (hdr, _) = take_rx(&mut conn, 0).unwrap();
    assert_eq!(hdr.op, op::CREDIT_UPDATE);
    assert_eq!(hdr.fwd_cnt, 64 * 1024);
}

#[test]
fn credit_request_is_answered() {
    let (mut conn, _theirs) = established(4096);
    conn.on_guest_packet::<()>(&guest_header(op::CREDIT_REQUEST, 4096, 0), None);
    conn.on_guest_packet::<()>(&guest_header(op::CREDIT_REQUEST, 4096, 0), None);
    let (hdr, _) = take_rx(&mut conn, 0).unwrap();
    assert_eq!(hdr.op, op::CREDIT_UPDATE);
    assert!(!conn.has_rx(), "duplicate requests coalesce");
}

#[test]
fn slow_host_buffers_guest_data_and_flushes_when_writable() {
    let (mut conn, mut theirs) = established(64 * 1024);
    // Fill the socket buffer until the host stream stops taking data.
    let mut sent = 0usize;
    let mut chunk = vec![1u8; 16 * 1024];
    while conn.to_host.is_empty() && sent < 4 << 20 {
        send_rw(&mut conn, &mut chunk, 0);
        sent += chunk.len();
        if conn.is_closed() || conn.has_rx() && conn.pending.contains(&op::RST) {
            panic!("connection reset while filling");
        }
        // Acknowledge credit updates as a guest would by simply discarding them.
        while conn.pending.front() == Some(&op::CREDIT_UPDATE) {
            conn.pending.pop_front();
            conn.last_fwd_cnt_sent = conn.fwd_cnt;
        }
    }
    assert!(!conn.to_host.is_empty(), "host stream never filled");
    assert!(conn.interest().contains(EventSet::OUT));
    // The host drains everything; flushing empties the queue.
    let reader = std::thread::spawn(move || {
        let mut total = 0usize;
        let mut buf = vec![0u8; 64 * 1024];
        while total < sent {
            let n = theirs.read(&mut buf).unwrap();
            assert!(buf[..n].iter().all(|&b| b == 1));
            total += n;
        }
        total
    });
    while !conn.to_host.is_empty() {
        conn.on_host_writable();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(reader.join().unwrap(), sent);
    assert_eq!(conn.fwd_cnt.0 as usize, sent);
    assert!(!conn.interest().contains(EventSet::OUT));
}

#[test]
fn guest_overrunning_its_credit_is_reset() {
    let (mut conn, theirs) = established(64 * 1024);
    // The host never reads, so data queues in `to_host` once the socket buffer is full.
    let mut chunk = vec![0u8; 64 * 1024];
    for _ in 0..64 {
        if conn.pending.contains(&op::RST) {
            break;
        }
        conn.pending.clear();
        send_rw(&mut conn, &mut chunk, 0);
    }
    let (hdr, _) = take_rx(&mut conn, 0).unwrap();
    assert_eq!(hdr.op, op::RST);
    assert!(conn.is_closed());
    drop(theirs);
}

#[test]
fn host_data_goes_to_the_guest_within_its_credit() {
    let (mut conn, mut theirs) = established(10);
    theirs.write_all(b"hello, guest!").unwrap();
    assert!(!conn.has_rx(), "nothing before the readable event");
    conn.on_host_readable();
    assert!(
        !conn.interest().contains(EventSet::IN),
        "no polling while undrained"
    );
    let (hdr, data) = take_rx(&mut conn, 4096).unwrap();
    assert_eq!((hdr.op, hdr.len), (op::RW, 10));
    assert_eq!(data, b"hello, gue");
    assert_eq!(conn.peer_credit(), 0);
    // Out of credit: exactly one CREDIT_REQUEST, then silence.
    let (hdr, _) = take_rx(&mut conn, 4096).unwrap();
    assert_eq!(hdr.op, op::CREDIT_REQUEST);
    assert!(!conn.has_rx());
    // The guest consumed the 10 bytes.
    conn.on_guest_packet::<()>(&guest_header(op::CREDIT_UPDATE, 10, 10), None);
    assert!(conn.has_rx());
    let (hdr, data) = take_rx(&mut conn, 4096).unwrap();
    assert_eq!((hdr.op, data.as_slice()), (op::RW, &b"st!"[..]));
    // Drained: the next attempt hits WouldBlock and re-arms input polling.
    assert!(take_rx(&mut conn, 4096).is_none());
    assert!(conn.interest().contains(EventSet::IN));
}

#[test]
fn host_eof_sends_shutdown_and_guest_close_gets_rst() {
    let (mut conn, theirs) = established(4096);
    theirs.shutdown(Shutdown::Write).unwrap();
    conn.on_host_readable();
    let (hdr, _) = take_rx(&mut conn, 4096).unwrap();
    assert_eq!((hdr.op, hdr.flags), (op::SHUTDOWN, SHUTDOWN_SEND));
    assert_eq!(conn.interest(), EventSet::empty());
    // Half-closed: the guest may still send.
    send_rw(&mut conn, &mut b"late".to_vec(), 0);
    let mut got = [0u8; 4];
    (&theirs).read_exact(&mut got).unwrap();
    assert_eq!(&got, b"late");
    let mut shutdown = guest_header(op::SHUTDOWN, 4096, 0);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    conn.on_guest_packet::<()>(&shutdown, None);
    let (hdr, _) = take_rx(&mut conn, 0).unwrap();
    assert_eq!(hdr.op, op::RST);
    assert!(conn.is_closed());
}

#[test]
fn guest_half_close_shuts_down_the_host_write_side() {
    let (mut conn, mut theirs) = established(4096);
    send_rw(&mut conn, &mut b"bye".to_vec(), 0);
    let mut shutdown = guest_header(op::SHUTDOWN, 4096, 0);
    shutdown.flags = SHUTDOWN_SEND;
    conn.on_guest_packet::<()>(&shutdown, None);
    let mut got = Vec::new();
    theirs.read_to_end(&mut got).unwrap();
    assert_eq!(got, b"bye");
    assert!(!conn.is_closed());
    // Data after SHUTDOWN(SEND) is a protocol violation.
    send_rw(&mut conn, &mut b"x".to_vec(), 0);
    assert_eq!(take_rx(&mut conn, 0).unwrap().0.op, op::RST);
}

#[test]
fn unexpected_packets_reset_and_rst_closes_silently() {
    let (mut conn, _theirs) = established(4096);
    conn.on_guest_packet::<()>(&guest_header(op::RESPONSE, 4096, 0), None);
    assert_eq!(take_rx(&mut conn, 0).unwrap().0.op, op::RST);
    let (mut conn, _theirs) = established(4096);
    conn.on_guest_packet::<()>(&guest_header(op::RST, 0, 0), None);
    assert!(conn.is_closed());
    assert!(!conn.has_rx());
}

/// Sends 16 KiB chunks until the host stream stops taking them; returns the bytes sent.
fn fill_until_buffered(conn: &mut Connection) -> usize {
    let mut sent = 0usize;
    let mut chunk = vec![9u8; 16 * 1024];
    while conn.to_host.is_empty() && sent < 4 << 20 {
        send_rw(conn, &mut chunk, 0);
        sent += chunk.len();
        // Credit updates would go to the guest; this guest ignores them.
        conn.pending.retain(|&op| op != op::CREDIT_UPDATE);
        conn.last_fwd_cnt_sent = conn.fwd_cnt;
        assert!(!conn.pending.contains(&op::RST), "reset while filling");
    }
    assert!(!conn.to_host.is_empty(), "host stream never filled");
    sent
}

#[test]
fn guest_close_delivers_buffered_data_before_the_rst() {
    let (mut conn, mut theirs) = established(64 * 1024);
    let sent = fill_until_buffered(&mut conn);
    let mut shutdown = guest_header(op::SHUTDOWN, 4096, 0);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    conn.on_guest_packet::<()>(&shutdown, None);
    assert!(!conn.has_rx(), "no RST while data is still queued");
    assert!(conn.has_deadline());
    assert_eq!(conn.interest(), EventSet::OUT, "only draining now");
    let reader = std::thread::spawn(move || {
        let mut all = Vec::new();
        theirs.read_to_end(&mut all).unwrap();
        all
    });
    while !conn.has_rx() {
        conn.on_host_writable();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(take_rx(&mut conn, 0).unwrap().0.op, op::RST);
    assert!(conn.is_closed());
    let all = reader.join().unwrap();
    assert_eq!(all.len(), sent, "every byte reached the host, then EOF");
}

#[test]
fn closed_connection_that_cannot_drain_times_out() {
    let (mut conn, _theirs) = established(64 * 1024);
    fill_until_buffered(&mut conn);
    let mut shutdown = guest_header(op::SHUTDOWN, 4096, 0);
    shutdown.flags = SHUTDOWN_RCV | SHUTDOWN_SEND;
    conn.on_guest_packet::<()>(&shutdown, None);
    assert!(!conn.is_expired(Instant::now()));
    assert!(conn.is_expired(Instant::now() + Duration::from_secs(6)));
    conn.reset();
    assert_eq!(take_rx(&mut conn, 0).unwrap().0.op, op::RST);
    assert!(conn.is_closed());
}
