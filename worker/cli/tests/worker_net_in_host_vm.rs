//! Sandbox egress networking through the real worker (`roost serve worker --net`), driven by a
//! real `roost serve control` through its E2B API: the create body's `allow_internet_access`
//! and `network.allowOut` / `denyOut` must reach the worker and be enforced on the VM's traffic.
//!
//! Inside the host VM a script builds the `base` template with a network device
//! (`roost templates build --network`) and starts the worker with `--net`. Control runs on this
//! machine and is reached from the host VM as 10.0.2.2 (QEMU user networking), so the worker
//! reserves that address: no sandbox may reach it. "The internet" is a web server this test
//! runs on this machine's own non-loopback address, which QEMU's user networking also reaches.
//! A probe in each guest (run through its agent's vsock socket in the worker's runtime
//! directory) checks, for:
//! - sandbox A (internet on): the web server is reached; control, the metadata address, the
//!   host VM's own service and other sandboxes' slot addresses are refused;
//! - sandbox B (internet off): the web server is refused at once;
//! - sandbox C (internet off, `allowOut` = the web server): reached; control still refused;
//! - A again after a pause and a resume (its network is made anew with the same policy).
//!
//! Then the worker is killed with SIGKILL: its VMMs die with it, and the restarted worker
//! (`--pool 1`) removes every namespace and interface the dead one left. Its warm clone waits
//! in networking that refuses everything; sandbox D (internet off, `allowOut` the web server)
//! is a pool hit and gets its own policy. SIGTERM then leaves no `roost-` namespace, interface
//! or nftables table, and no VMM.
//!
//! Needs qemu-system-x86, release binaries (`cargo build --release -p roost -p roost-agent`)
//! and the `kernel` and `rootfs-base` artefacts (`roost images build`).

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;
use serde_json::{Value, json};
use support::{
    EGRESS_PROBE, Signal, http, signal_server, start_control_for_host_vm, tail, tenant_api_key,
    wait_for_worker_offering,
};

/// Template build plus worker start inside the host VM.
const JOIN_WITHIN: Duration = Duration::from_secs(1500);
/// What the web server standing in for the internet answers.
const WEB_REPLY: &str = "HTTP/1.0 200 internet\r\ncontent-length: 0\r\n\r\n";

const SCRIPT: &str = r#"
result() { echo "RESULT $1 $2"; }
for m in tun veth nf_tables nft_ct nft_nat nft_chain_nat nft_masq nft_reject nft_reject_ipv4; do
  modprobe $m 2>/dev/null
done
RT=/tmp/worker-rt
WD=/tmp/worker-data
WEB=$WEB_IP:$WEB_PORT
CONTROL=10.0.2.2:$API_PORT
cat > /tmp/probe.py <<'PYEOF'
@PROBE@
PYEOF
roost_procs() {
  for d in /proc/[0-9]*; do
    c=$(tr '\0' ' ' < $d/cmdline 2>/dev/null)
    set -- $c
    case "$1 $2 $3" in roost" "*" run"|*/roost" "*" run") [ "$2" = vm ] && echo "${d#/proc/} $c";; esac
  done
}
# The host VM's own service, which no sandbox may reach.
mkdir -p /tmp/www && echo worker > /tmp/www/index.html
httpd -p 7000 -h /tmp/www
roost templates build --image base --network --runtime-root /tmp/build-rt --ready-timeout 240 \
    > /tmp/build.out 2>/tmp/build.err
result build $?
result build-netns "$(roost net list | grep -c '^netns ')"
worker() { # N [ARGS...]
  n=$1; shift
  RUST_LOG=info,roost_worker=debug,roost_net=debug roost serve worker \
      --control-url http://$CONTROL --data-dir $WD --runtime-root $RT --template base \
      --ready-timeout 240 --max-backoff 5s --net --net-upstream-dns 10.0.2.3:53 --net-pool 1 \
      "$@" > /tmp/worker$n.out 2>/tmp/worker$n.err &
}
logs() {
  sed 's/^/WORKER-OUT /' /tmp/worker*.out
  sed 's/^/WORKER1-ERR /' /tmp/worker1.err | tail -n 150
  sed 's/^/WORKER2-ERR /' /tmp/worker2.err 2>/dev/null | tail -n 80
  sed 's/^/BUILD-ERR /' /tmp/build.err | tail -n 30
  for f in /tmp/probe-*.err; do sed "s|^|STDERR $(basename $f .err): |" "$f"; done
}
# The test's word on its signal port: `wait`, or `probe NAME=ID...` once sandboxes run.
phase() { wget -q -O - http://10.0.2.2:$SIGNAL_PORT/$1 2>/dev/null; }
await() { # WORD: waits until the phase starts with WORD, then sets PHASE to it
  i=0
  until PHASE=$(phase) && [ "${PHASE%% *}" = "$1" ]; do
    # `done` before its turn: the test gave up; stop everything and show why.
    [ "$PHASE" = done ] && { result aborted-at $1; kill -9 $W 2>/dev/null; logs; exit 1; }
    i=$((i+1)); [ $i -gt 2400 ] && { result signal-$1 timeout; return; }
    sleep 1
  done
}
dir_of() { # ID: the runtime directory the worker logged for sandbox ID (a pool hit's is a pool-* one)
  cat /tmp/worker*.err | grep 'sandbox VM running' | grep "sandbox=\"$1\"" | tail -n 1 \
    | sed 's/.*runtime_dir=\([^ ]*\).*/\1/'
}
probe() { # NAME ID PROBES...: runs the probe in sandbox ID, one RESULT NAME-PROBE each
  name=$1 id=$2; shift 2
  timeout 150 roost-agent-ctl --vsock-uds "$(dir_of $id)/vsock.sock" exec -- python3 -c "$(cat /tmp/probe.py)" "$@" \
    > /tmp/probe-$name.out 2>/tmp/probe-$name.err
  result $name-exit $?
  grep '^PROBE ' /tmp/probe-$name.out | while read _ n o; do result $name-$n "$o"; done
}
ids() { for kv in $1; do case $kv in $2=*) echo ${kv#*=};; esac; done; }
worker 1
W=$!
await probe
A=$(ids "$PHASE" a) B=$(ids "$PHASE" b) C=$(ids "$PHASE" c)
result netns-running "$(roost net list | grep -c '^netns ')"
probe a $A web=$WEB control=$CONTROL meta=169.254.169.254:80 worker=10.0.2.15:7000 \
  peer1=10.213.0.1:7000 peer2=10.213.0.2:53 peer5=10.213.0.5:7000 peer6=10.213.0.6:53
probe b $B web=$WEB meta=169.254.169.254:80
probe c $C web=$WEB control=$CONTROL
phase probed > /dev/null
await reprobe
probe a2 $A web=$WEB control=$CONTROL
phase reprobed > /dev/null
await crash
result running-vmms "$(roost_procs | wc -l)"
kill -9 $W
wait $W 2>/dev/null
sleep 1
result crash-vmms "$(roost_procs | wc -l)"
result crash-netns "$(roost net list | grep -c '^netns ')"
worker 2 --pool 1 --pool-memory-mib 512
W=$!
i=0
until grep -q 'joined control' /tmp/worker2.out; do
  i=$((i+1)); [ $i -gt 240 ] && { result rejoined timeout; break; }
  sleep 1
done
# The dead worker's namespaces are gone; there are the new ready slot and the warm clone's.
i=0
until [ "$(roost net list | grep -c '^netns ')" = 2 ] || [ $i -gt 60 ]; do i=$((i+1)); sleep 1; done
result restart-netns "$(roost net list | grep -c '^netns ')"
roost net list | sed 's/^/RESTART-LIST /'
phase rejoined > /dev/null
await pooled
D=$(ids "$PHASE" d)
result d-pooled "$(dir_of $D | grep -c /pool-)"
probe d $D web=$WEB control=$CONTROL
phase probed-d > /dev/null
await done
kill -TERM $W
i=0
while kill -0 $W 2>/dev/null; do
  i=$((i+1)); [ $i -gt 120 ] && { result worker-stop timeout; kill -9 $W; break; }
  sleep 1
done
wait $W
result worker-exit $?
result leftover-net "$(roost net list | wc -l)"
roost net list | sed 's/^/LEFTOVER /'
result leftover-procs "$(roost_procs | wc -l)"
result leftover-files "$(find $RT -mindepth 1 | wc -l)"
logs
"#;

/// This machine's first non-loopback IPv4 address: the host VM reaches it through QEMU's user
/// networking like any outside address (10.0.2.2, control's, is reserved by the worker).
fn outside_address() -> Ipv4Addr {
    let routed = UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|()| s))
        .and_then(|s| s.local_addr())
        .ok()
        .and_then(|a| match a.ip() {
            IpAddr::V4(ip) if !ip.is_loopback() && !ip.is_unspecified() => Some(ip),
            _ => None,
        });
    if let Some(ip) = routed {
        return ip;
    }
    let out = Command::new("hostname").arg("-I").output().ok();
    let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    text.unwrap_or_default()
        .split_whitespace()
        .filter_map(|w| w.parse::<Ipv4Addr>().ok())
        .find(|ip| !ip.is_loopback())
        .expect(
            "this test needs a non-loopback IPv4 address on this machine for its stand-in \
             internet (control's 10.0.2.2 is reserved by the worker)",
        )
}

/// Answers every connection with [`WEB_REPLY`]; returns its port.
fn web_server(ip: Ipv4Addr) -> u16 {
    let listener = TcpListener::bind((ip, 0)).expect("bind the stand-in internet server");
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 1024];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(WEB_REPLY.as_bytes());
        }
    });
    port
}

/// Control's E2B API with one tenant's key; every call is logged.
struct Api {
    addr: SocketAddr,
    key: String,
    log: Vec<String>,
}

impl Api {
    fn call(&mut self, what: &str, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let started = Instant::now();
        let header = format!("x-api-key: {}\r\n", self.key);
        let (status, reply) = http(self.addr, method, path, &header, body);
        let line = format!(
            "{what}: {status} in {} ms: {reply}",
            started.elapsed().as_millis()
        );
        eprintln!("worker_net_in_host_vm: {line}");
        self.log.push(line);
        (status, reply)
    }

    /// Creates a `base` sandbox with `network` settings; its id.
    fn create(&mut self, what: &str, internet: bool, network: Value) -> Result<String, String> {
        let body = json!({
            "templateID": "base",
            "timeout": 3600,
            "allow_internet_access": internet,
            "network": network,
        });
        let (status, created) = self.call(what, "POST", "/v2/sandboxes", Some(body));
        match created["sandboxID"].as_str() {
            Some(id) if status == 201 => Ok(id.to_owned()),
            _ => Err(format!("{what}: {status} {created}")),
        }
    }

    fn expect(&mut self, what: &str, method: &str, path: &str, want: u16) -> Result<(), String> {
        let (status, body) = self.call(what, method, path, Some(json!({"timeout": 3600})));
        if status == want {
            Ok(())
        } else {
            Err(format!("{what}: {status} {body}"))
        }
    }
}

/// Signs a tenant up and waits for the worker to offer `base`.
fn tenant(api: SocketAddr, done: &AtomicBool) -> Result<Api, String> {
    let key = tenant_api_key(api, "net@example.com")?;
    wait_for_worker_offering(api, "base", JOIN_WITHIN, done)?;
    Ok(Api {
        addr: api,
        key,
        log: Vec::new(),
    })
}

/// The API side of the script's phases.
fn drive(api: &mut Api, web: &str, signal: &Signal, done: &AtomicBool) -> Result<(), String> {
    let step = Duration::from_secs(600);
    let a = api.create("create A (internet)", true, json!({}))?;
    let b = api.create("create B (no internet)", false, json!({}))?;
    let c = api.create(
        "create C (allowOut the web server)",
        false,
        json!({"allowOut": [web], "denyOut": ["0.0.0.0/0"]}),
    )?;
    signal.set(format!("probe a={a} b={b} c={c}"));
    signal.wait_for("/probed", step, done)?;
    api.expect("pause A", "POST", &format!("/sandboxes/{a}/pause"), 204)?;
    api.expect("resume A", "POST", &format!("/sandboxes/{a}/resume"), 201)?;
    signal.set("reprobe");
    signal.wait_for("/reprobed", step, done)?;
    signal.set("crash");
    signal.wait_for("/rejoined", step, done)?;
    // Control may still be replacing the dead session: bounded retries.
    let deadline = Instant::now() + Duration::from_secs(120);
    let d = loop {
        match api.create(
            "create D on the restarted worker",
            false,
            json!({"allowOut": [web]}),
        ) {
            Ok(id) => break id,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_secs(2)),
        }
    };
    signal.set(format!("pooled d={d}"));
    signal.wait_for("/probed-d", step, done)?;
    Ok(())
}

#[test]
fn worker_net_in_host_vm_enforces_each_sandboxs_egress_policy() {
    let data = tempfile::tempdir().unwrap();
    let (control, api, token) = start_control_for_host_vm(data.path(), &[]);
    let web_ip = outside_address();
    let web_port = web_server(web_ip);

    let signal = Arc::new(Signal::default());
    let signal_port = signal_server(signal.clone());
    let script_done = Arc::new(AtomicBool::new(false));
    let finished = script_done.clone();
    let vm = std::thread::spawn(move || {
        let run = ScriptRun::run(
            HostVm::builder()
                .timeout(roost_hostvm::script::TEST_LIMIT)
                .mem_mib(4096)
                .env("API_PORT", api.port().to_string())
                .env("SIGNAL_PORT", signal_port.to_string())
                .env("WEB_IP", web_ip.to_string())
                .env("WEB_PORT", web_port.to_string())
                .env("ROOST_WORKER_TOKEN", token),
            &SCRIPT.replace("@PROBE@", EGRESS_PROBE),
            &["kernel", "rootfs-base"],
        );
        finished.store(true, Ordering::SeqCst);
        run
    });

    let mut api_log = Vec::new();
    let outcome = tenant(api, &script_done).and_then(|mut client| {
        let result = drive(&mut client, &web_ip.to_string(), &signal, &script_done);
        api_log = std::mem::take(&mut client.log);
        result
    });
    signal.set("done");
    let run = vm.join().unwrap().unwrap_or_else(|e| {
        panic!("host VM run (needs release binaries: cargo build --release -p roost): {e:#?}")
    });
    let all = format!(
        "{}\nAPI log:\n{}\ncontrol stderr (tail):\n{}",
        run.transcript(),
        api_log.join("\n"),
        tail(&control.stderr.lock().unwrap(), 6000),
    );
    if let Err(e) = outcome {
        panic!("{e}\n{all}");
    }
    let get = |key: &str| run.expect_result(key).to_owned();
    assert_eq!(get("build"), "0", "the networked template builds; {all}");
    assert_eq!(
        get("build-netns"),
        "0",
        "the build's isolated namespace is removed; {all}"
    );
    let reached = "reached:HTTP/1.0_200_internet";
    for (key, want, why) in [
        ("a-exit", "0", "the probe ran in A"),
        ("a-web", reached, "internet on: the web server is reached"),
        ("a-control", "refused", "control's address is reserved"),
        ("a-meta", "refused", "the metadata address is refused"),
        (
            "a-worker",
            "refused",
            "the worker host's own service is refused",
        ),
        ("a-peer1", "refused", "other sandboxes' slots are refused"),
        ("a-peer2", "refused", "other sandboxes' slots are refused"),
        ("a-peer5", "refused", "other sandboxes' slots are refused"),
        ("a-peer6", "refused", "other sandboxes' slots are refused"),
        ("b-exit", "0", "the probe ran in B"),
        ("b-web", "refused", "internet off: refused at once"),
        ("b-meta", "refused", "internet off: metadata refused"),
        ("c-web", reached, "allowOut admits the web server"),
        ("c-control", "refused", "allowOut does not open control"),
        (
            "a2-web",
            reached,
            "after pause and resume A has its network back",
        ),
        ("a2-control", "refused", "and its policy"),
        ("running-vmms", "3", "three sandboxes ran before the crash"),
        ("crash-vmms", "0", "VMMs die with a killed worker"),
        (
            "restart-netns",
            "2",
            "a restart removes the dead worker's namespaces: one ready slot and the warm clone's are left",
        ),
        (
            "d-pooled",
            "1",
            "D is a pool hit (a warm clone's directory)",
        ),
        ("d-exit", "0", "the probe ran in D"),
        ("d-web", reached, "a pool hit gets its own allowOut"),
        ("d-control", "refused", "and control stays reserved"),
        ("worker-exit", "0", "SIGTERM stops the worker"),
        (
            "leftover-net",
            "0",
            "no namespace, interface or table is left",
        ),
        ("leftover-procs", "0", "no VMM is left"),
        ("leftover-files", "0", "the runtime root is empty"),
    ] {
        assert_eq!(get(key), want, "{key}: {why}; {all}");
    }
    assert!(
        get("netns-running").parse::<u32>().unwrap_or(0) >= 3,
        "each running sandbox has its namespace; {all}"
    );
    assert_eq!(run.exit_code, 0, "{all}");
}
