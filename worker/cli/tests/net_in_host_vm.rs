//! Sandbox egress networking with real microVMs, inside the host VM: `roost net run` gives each
//! sandbox its namespace, tap, NAT, policy and DNS forwarder, and `roost sandbox run` started
//! in it boots a VM whose virtio-net device is attached to the tap (ROOST_VM_NET_TAP). A probe
//! in the guest tries destinations and names; the test checks each outcome.
//!
//! "The internet" is this machine: a web server and a DNS server that this test runs on
//! 127.0.0.1, which the host VM reaches as 10.0.2.2 through QEMU's user networking, so
//! sandbox traffic goes guest → tap → namespace NAT → host VM forwarding + masquerade → out.
//! Also checked: the metadata address, the host VM's own service port and the other sandbox's
//! addresses are refused at once; after everything (and after a `kill -9` of `roost net run`
//! followed by `roost net cleanup`) no `roost-` namespace, interface or nftables table is left.
//!
//! Needs qemu-system-x86, release binaries (`cargo build --release -p roost -p roost-agent`)
//! and the `kernel` and `rootfs-base` artefacts (`roost images build`).

mod support;

use std::io::{Read, Write};
use std::net::{TcpListener, UdpSocket};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record};
use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;
use support::EGRESS_PROBE;

const SCRIPT: &str = r#"
result() { echo "RESULT $1 $2"; }
for m in tun veth nf_tables nft_ct nft_nat nft_chain_nat nft_masq nft_reject nft_reject_ipv4; do
  modprobe $m 2>/dev/null
done
RT=/tmp/rt
NET="timeout 600 roost net run --upstream-dns 10.0.2.2:$DNS_PORT"
SB="roost sandbox run --runtime-root $RT --ready-timeout 240"
WEB=10.0.2.2:$WEB_PORT
cat > /tmp/probe.py <<'PYEOF'
@PROBE@
PYEOF
PROBE=$(cat /tmp/probe.py)
# The host VM's own service, which no sandbox may reach.
mkdir -p /tmp/www && echo worker > /tmp/www/index.html
httpd -p 7000 -h /tmp/www
result worker-local "$(wget -qO- http://10.0.2.15:7000/ 2>/dev/null)"
stop_job() { # PID SIGNAL SECONDS: signal a background job and wait for it (SIGKILL after SECONDS)
  kill -$2 $1 2>/dev/null
  i=0
  while s=$(cut -d' ' -f3 /proc/$1/stat 2>/dev/null) && [ -n "$s" ] && [ "$s" != Z ] && [ $i -lt $(($3 * 5)) ]; do
    usleep 200000; i=$((i+1))
  done
  [ $i -lt $(($3 * 5)) ] || { echo "DIAG job $1 still running $3 s after SIG$2; killing it"; kill -9 $1; }
  wait $1
}
wait_for() { i=0; until grep -q "$2" "$1" 2>/dev/null; do i=$((i+1)); [ $i -lt 1200 ] || break; usleep 200000; done; }
probe() { # LOG POLICY... -- PROBES...
  log=$1; shift
  pol=""; while [ "$1" != "--" ]; do pol="$pol $1"; shift; done; shift
  $NET $pol -- $SB -- python3 -c "$PROBE" "$@" > /tmp/$log.out 2>/tmp/$log.err
  result $log-exit $?
  grep '^PROBE ' /tmp/$log.out | while read _ n o; do result $log-$n "$o"; done
}

# A background sandbox (internet on) that the others must not reach.
roost net run --upstream-dns 10.0.2.2:$DNS_PORT --internet -- $SB -- sleep 300 \
  > /dev/null 2>/tmp/bg.err &
BG=$!
wait_for /tmp/bg.err 'sandbox ready in'
result bg-netns "$(roost net list | grep -c '^netns ')"

probe open --internet --deny-out 10.0.2.3 --deny-out denied.test -- \
  web=$WEB name=dns:web.test denied=dns:denied.test dnsdeny=10.0.2.3:53 \
  meta=169.254.169.254:80 worker=10.0.2.15:7000 \
  peer1=10.213.0.1:7000 peer2=10.213.0.2:53 peer5=10.213.0.5:7000 peer6=10.213.0.6:53
probe names --allow-out web.test -- \
  before=$WEB other=dns:other.test name=dns:web.test after=web.test:$WEB_PORT
probe cidr --deny-out 0.0.0.0/0 --allow-out 10.0.2.2 -- web=$WEB dnsdeny=10.0.2.3:53

stop_job $BG TERM 120
result bg-exit $?
result after-list "$(roost net list | wc -l)"
roost net list | sed 's/^/LEFT /'

# A crashed `roost net run` (kill -9) leaves its namespace; cleanup removes everything.
roost net run --upstream-dns 10.0.2.2:$DNS_PORT -- sleep 600 > /dev/null 2>/tmp/crash.err &
C=$!
wait_for /tmp/crash.err 'network ready'
result crash-list "$(roost net list | wc -l)"
stop_job $C 9 30 2>/dev/null
killall -9 sleep 2>/dev/null
result cleanup "$(roost net cleanup | wc -l)"
result cleaned-list "$(roost net list | wc -l)"
result leftover-rt "$(find $RT -mindepth 1 2>/dev/null | wc -l)"
for f in /tmp/*.err; do sed "s|^|STDERR $(basename $f .err): |" "$f"; done
"#;

/// Answers `web.test` (and any other name but the two below) with 10.0.2.2; `other.test`
/// with 10.0.2.3; `denied.test` would be 10.0.2.2 too (the forwarder must refuse it).
fn serve_dns(socket: UdpSocket) {
    let mut buf = [0u8; 1500];
    while let Ok((len, peer)) = socket.recv_from(&mut buf) {
        let Ok(mut message) = Message::from_vec(&buf[..len]) else {
            continue;
        };
        message.metadata.message_type = MessageType::Response;
        let Some(query) = message.queries.first() else {
            continue;
        };
        let name = query.name().clone();
        match name.to_ascii().as_str() {
            "other.test." => message.add_answer(Record::from_rdata(
                name,
                300,
                RData::A(A::from_str("10.0.2.3").unwrap()),
            )),
            n if n.ends_with(".test.") => message.add_answer(Record::from_rdata(
                name,
                300,
                RData::A(A::from_str("10.0.2.2").unwrap()),
            )),
            _ => {
                message.metadata.response_code = ResponseCode::NXDomain;
                &mut message
            }
        };
        if let Ok(bytes) = message.to_vec() {
            let _ = socket.send_to(&bytes, peer);
        }
    }
}

/// Answers every connection with `HTTP/1.0 200 OK` and `hello`.
fn serve_web(listener: TcpListener) {
    for mut stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\n\r\nhello\n");
        });
    }
}

#[test]
fn net_in_host_vm_enforces_egress_policy_and_leaves_nothing() {
    let web = TcpListener::bind("127.0.0.1:0").unwrap();
    let dns = UdpSocket::bind("127.0.0.1:0").unwrap();
    let web_port = web.local_addr().unwrap().port();
    let dns_port = dns.local_addr().unwrap().port();
    std::thread::spawn(move || serve_web(web));
    std::thread::spawn(move || serve_dns(dns));

    let run = ScriptRun::run(
        HostVm::builder()
            .timeout(roost_hostvm::script::TEST_LIMIT)
            .mem_mib(4096)
            .env("WEB_PORT", web_port.to_string())
            .env("DNS_PORT", dns_port.to_string()),
        &SCRIPT.replace("@PROBE@", EGRESS_PROBE),
        &["kernel", "rootfs-base"],
    )
    .unwrap_or_else(|e| {
        panic!("host VM run (needs release binaries: cargo build --release -p roost): {e:#?}")
    });
    let all = run.transcript();
    let get = |key: &str| run.expect_result(key).to_owned();
    let reached = "reached:HTTP/1.0_200_OK";

    assert_eq!(
        get("worker-local"),
        "worker",
        "the host VM's own server is up; {all}"
    );
    assert_eq!(get("bg-netns"), "1", "{all}");

    assert_eq!(get("open-exit"), "0", "{all}");
    assert_eq!(get("open-web"), reached, "internet on; {all}");
    assert_eq!(get("open-name"), "resolved:10.0.2.2", "{all}");
    assert_eq!(
        get("open-denied"),
        "nodns",
        "a denied name is not resolved; {all}"
    );
    assert_eq!(get("open-dnsdeny"), "refused", "denyOut CIDR; {all}");
    assert_eq!(get("open-meta"), "refused", "169.254.169.254; {all}");
    assert_eq!(get("open-worker"), "refused", "the host's own port; {all}");
    for peer in ["peer1", "peer2", "peer5", "peer6"] {
        assert_eq!(get(&format!("open-{peer}")), "refused", "{peer}; {all}");
    }

    assert_eq!(get("names-exit"), "0", "{all}");
    assert_eq!(
        get("names-before"),
        "refused",
        "internet off fails fast; {all}"
    );
    assert_eq!(
        get("names-other"),
        "nodns",
        "internet off: no other names; {all}"
    );
    assert_eq!(get("names-name"), "resolved:10.0.2.2", "{all}");
    assert_eq!(
        get("names-after"),
        reached,
        "the allowed name's address; {all}"
    );

    assert_eq!(get("cidr-exit"), "0", "{all}");
    assert_eq!(
        get("cidr-web"),
        reached,
        "allowOut beats denyOut 0.0.0.0/0; {all}"
    );
    assert_eq!(get("cidr-dnsdeny"), "refused", "{all}");

    assert_eq!(
        get("after-list"),
        "0",
        "no namespace/veth/table left; {all}"
    );
    assert_eq!(
        get("crash-list"),
        "3",
        "netns, veth and table while running; {all}"
    );
    assert_eq!(get("cleanup"), "3", "cleanup removed all three; {all}");
    assert_eq!(get("cleaned-list"), "0", "{all}");
    assert_eq!(get("leftover-rt"), "0", "{all}");
}
