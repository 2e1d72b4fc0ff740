//! roost-net on this host's real kernel (needs root): pool, hand-out with each kind of policy,
//! isolation, DNS host-name rules, release, and stale cleanup after a simulated crash.
//!
//! No VM here: a *stand-in guest* takes the VM's place. The slot's tap is swapped for a veth
//! named `tap0` whose other end sits in a namespace of its own with the guest's address
//! (169.254.0.2/30, default route and DNS via 169.254.0.1), so its packets enter the sandbox's
//! namespace on `tap0` exactly as the VM's would. "The internet" is another namespace reached
//! through the host's forwarding and masquerade (198.51.100.0/24, TEST-NET-2), with a TCP
//! server on 198.51.100.1:80 and 198.51.100.2:80 and a DNS server on 198.51.100.1:53. The
//! host-VM test (`worker/cli/tests/net_in_host_vm.rs`) does the same with real VMs.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsFd;
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use nlink::netlink::addr::Ipv4Address;
use nlink::netlink::link::VethLink;
use nlink::netlink::namespace;
use nlink::netlink::route::Ipv4Route;
use nlink::netlink::{Connection, Route};
use roost_net::fixture::Internet;
use roost_net::netns::run_in;
use roost_net::{EgressPolicy, Ipv4Net, NetConfig, NetManager, SandboxNet};

/// The test's own names (not `roost-`, so the crate's cleanup never touches them).
const INET_NS: &str = "rnt-inet";
const HOST_INET_IP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 254);
const WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const OTHER_WEB: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);

/// How a connection attempt from the stand-in guest ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Connected and read the server's greeting.
    Reached(String),
    /// Refused or unreachable at once (what a `reject` gives).
    Refused,
    /// Nothing came back (a silent drop).
    TimedOut,
}

fn connect(addr: SocketAddr) -> Outcome {
    match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
        Ok(mut stream) => {
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let mut greeting = String::new();
            match stream.read_to_string(&mut greeting) {
                Ok(_) => Outcome::Reached(greeting),
                Err(_) => Outcome::TimedOut,
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => Outcome::TimedOut,
        Err(_) => Outcome::Refused,
    }
}

/// A query for `name` to the guest's DNS server; the response code and A records.
fn resolve(name: &str) -> Option<(ResponseCode, Vec<Ipv4Addr>)> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut query = Message::query();
    query.metadata.id = 7;
    query.metadata.recursion_desired = true;
    query.add_query(Query::query(Name::from_str(name).ok()?, RecordType::A));
    socket
        .send_to(&query.to_vec().ok()?, (roost_net::GUEST_GATEWAY, 53))
        .ok()?;
    let mut buf = [0u8; 1500];
    let len = socket.recv(&mut buf).ok()?;
    let reply = Message::from_vec(&buf[..len]).ok()?;
    let addrs = reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    Some((reply.metadata.response_code, addrs))
}

/// A server greeting every connection, on `addr` inside namespace `ns` (or the host's).
fn greeter(ns: Option<&str>, addr: SocketAddr) {
    let listener = match ns {
        Some(ns) => run_in(ns, move || TcpListener::bind(addr))
            .unwrap()
            .unwrap(),
        None => TcpListener::bind(addr).unwrap(),
    };
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(format!("hello from {addr}").as_bytes());
        }
    });
}

/// The "internet": a namespace behind the host with two web servers and a DNS server.
async fn internet() -> Internet {
    let inet = Internet::create(INET_NS, HOST_INET_IP, &[WEB, OTHER_WEB])
        .await
        .unwrap();
    for addr in [WEB, OTHER_WEB] {
        greeter(Some(INET_NS), SocketAddr::from((addr, 80)));
    }
    // A service of the host itself (the worker's ports).
    greeter(None, SocketAddr::from((HOST_INET_IP, 8080)));
    let dns = run_in(INET_NS, || UdpSocket::bind((WEB, 53)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || serve_dns(&dns));
    inet
}

/// Answers `web.test` → 198.51.100.1, `other.test` → 198.51.100.2, anything else NXDOMAIN.
fn serve_dns(socket: &UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((len, peer)) = socket.recv_from(&mut buf) {
        let Ok(mut message) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        message.metadata.message_type = MessageType::Response;
        let name = message.queries[0].name().clone();
        let addr = match name.to_ascii().as_str() {
            "web.test." => Some(WEB),
            "other.test." => Some(OTHER_WEB),
            _ => None,
        };
        match addr {
            Some(a) => {
                message.add_answer(Record::from_rdata(name, 300, RData::A(A::from(a))));
            }
            None => message.metadata.response_code = ResponseCode::NXDomain,
        }
        let _ = socket.send_to(&message.to_vec().unwrap(), peer);
    }
}

/// Replaces the slot's tap by a veth `tap0` whose peer is the stand-in guest's `eth0` in
/// namespace `guest_ns`; returns that namespace's name.
async fn stand_in_guest(net: &SandboxNet, guest_ns: &str) {
    let _ = namespace::delete(guest_ns);
    namespace::create(guest_ns).unwrap();
    let sandbox = std::fs::File::open(roost_net::netns::path(net.netns())).unwrap();
    let guest = std::fs::File::open(roost_net::netns::path(guest_ns)).unwrap();
    let inside: Connection<Route> = Connection::new_in(sandbox.as_fd()).unwrap();
    inside.del_link("tap0").await.unwrap();
    inside
        .add_link(VethLink::new("tap0", "eth0").peer_netns_fd(guest.as_fd()))
        .await
        .unwrap();
    inside
        .add_address(Ipv4Address::new("tap0", roost_net::GUEST_GATEWAY, 30))
        .await
        .unwrap();
    inside.set_link_up("tap0").await.unwrap();
    let g: Connection<Route> = Connection::new_in(guest.as_fd()).unwrap();
    g.set_link_up("lo").await.unwrap();
    g.add_address(Ipv4Address::new("eth0", roost_net::GUEST_IP, 30))
        .await
        .unwrap();
    g.set_link_up("eth0").await.unwrap();
    g.add_route(
        Ipv4Route::default_route()
            .gateway(roost_net::GUEST_GATEWAY)
            .dev("eth0"),
    )
    .await
    .unwrap();
}

fn in_guest<T: Send + 'static>(guest_ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    run_in(guest_ns, f).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_get_their_policy_and_nothing_else_and_nothing_leaks() {
    let leftovers = roost_net::remove_stale().await.unwrap();
    eprintln!("stale state before the test: {leftovers:?}");
    let inet = internet().await;
    let web = SocketAddr::from((WEB, 80));
    let other = SocketAddr::from((OTHER_WEB, 80));

    let mut config = NetConfig::new(SocketAddr::from((WEB, 53)));
    config.pool_range = Ipv4Net::from_str("10.213.0.0/24").unwrap();
    config.pool_size = 2;
    let manager = NetManager::start(config).await.unwrap();
    manager.fill_pool().await.unwrap();
    assert_eq!(manager.pooled().await, 2);

    // Internet on, one destination denied.
    let open = manager
        .acquire(EgressPolicy::parse(true, &[] as &[&str], &["198.51.100.2"]).unwrap())
        .await
        .unwrap();
    stand_in_guest(&open, "rnt-g1").await;
    let open_slot = open.addrs().clone();
    // Internet off, one host name allowed.
    let closed = manager
        .acquire(EgressPolicy::parse(false, &["web.test"], &[] as &[&str]).unwrap())
        .await
        .unwrap();
    stand_in_guest(&closed, "rnt-g2").await;
    let closed_slot = closed.addrs().clone();
    // Something listening inside the second sandbox's namespace and on its host veth.
    greeter(
        Some(closed.netns()),
        SocketAddr::from((closed_slot.ns_ip, 80)),
    );
    greeter(None, SocketAddr::from((closed_slot.host_ip, 80)));

    let results = in_guest("rnt-g1", move || {
        (
            connect(web),
            connect(other),
            connect(SocketAddr::from(([169, 254, 169, 254], 80))),
            connect(SocketAddr::from((closed_slot.ns_ip, 80))),
            connect(SocketAddr::from((closed_slot.host_ip, 80))),
            connect(SocketAddr::from((HOST_INET_IP, 8080))),
            resolve("other.test."),
        )
    });
    assert_eq!(
        results.0,
        Outcome::Reached(format!("hello from {web}")),
        "internet on"
    );
    assert_eq!(results.1, Outcome::Refused, "denyOut wins over internet on");
    assert_eq!(results.2, Outcome::Refused, "metadata address blocked");
    assert_eq!(results.3, Outcome::Refused, "another sandbox's namespace");
    assert_eq!(results.4, Outcome::Refused, "another sandbox's host veth");
    assert_eq!(results.5, Outcome::Refused, "the host itself");
    assert_eq!(
        results.6.map(|r| r.0),
        Some(ResponseCode::NoError),
        "internet on: any name resolves"
    );

    let results = in_guest("rnt-g2", move || {
        (
            connect(web),
            resolve("other.test."),
            resolve("web.test."),
            connect(web),
            connect(other),
            connect(SocketAddr::from((open_slot.ns_ip, 80))),
        )
    });
    assert_eq!(
        results.0,
        Outcome::Refused,
        "internet off, nothing resolved yet"
    );
    assert_eq!(
        results.1.map(|r| r.0),
        Some(ResponseCode::Refused),
        "internet off: names not allowed are not resolved"
    );
    assert_eq!(results.2, Some((ResponseCode::NoError, vec![WEB])));
    assert_eq!(
        results.3,
        Outcome::Reached(format!("hello from {web}")),
        "the allowed name's address is admitted"
    );
    assert_eq!(results.4, Outcome::Refused, "other addresses stay closed");
    assert_eq!(results.5, Outcome::Refused, "the other sandbox");

    // Release one, then simulate a crash with the other still out and the pool full again.
    manager.release(open).await.unwrap();
    manager.fill_pool().await.unwrap();
    let _ = namespace::delete("rnt-g1");
    std::mem::forget(closed);
    let found = roost_net::inventory().await.unwrap();
    assert_eq!(
        found.namespaces.len(),
        3,
        "one handed out, two pooled: {found:?}"
    );
    assert_eq!(found.links.len(), 3, "{found:?}");
    assert!(found.host_table);
    let report = roost_net::remove_stale().await.unwrap();
    assert_eq!(report.namespaces.len(), 3, "{report:?}");
    assert!(report.host_table);
    let _ = namespace::delete("rnt-g2");
    // The kernel frees the namespaces (and with them the veths' peers) asynchronously.
    let mut found = roost_net::inventory().await.unwrap();
    for _ in 0..50 {
        if found == roost_net::Inventory::default() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        found = roost_net::inventory().await.unwrap();
    }
    assert_eq!(found, roost_net::Inventory::default(), "nothing left");
    inet.remove().await.unwrap();
}
