//! `roost serve worker` on real KVM, driven by a real `roost serve control`: control runs on
//! this machine (SQLite in a temporary data directory); inside the host VM a script builds the
//! `base` template and starts the worker with a registration token, which reaches control at
//! 10.0.2.2 through QEMU's user networking (REST for registration, the QUIC channel through
//! `--channel-public-addr`). The test then uses the E2B API with a tenant's API key: create a
//! sandbox, see it running (state and a metrics sample from its VMM), pause, resume, pause,
//! resume, create a second one, kill the first; then the script kills the worker with SIGKILL
//! (the second VM must die with it) and restarts it (credentials reused, the stale runtime
//! directory and cgroup removed) with a warm pool of one clone (`--pool 1`, watched through
//! its `--metrics-addr`); a third sandbox created on it must be a pool hit, the pool must
//! refill, and SIGTERM must stop both VMs and leave nothing in the runtime root, no VMM process
//! and no sandbox cgroup (the worker runs with `--cgroup-parent`).
//! A `roost serve gateway` on this machine takes the worker's tunnel (`--gateway`): envd's
//! `/envs` in the sandbox is read through it (`49983-<id>.roost.test`) after the create and
//! after a resume, and a request to the paused sandbox resumes it (the gateway's auto-resume).
//! A snapshot of the sandbox becomes a template: a sandbox created from it still has the first
//! one's env in envd's memory; it is killed and the template deleted.
//!
//! Needs qemu-system-x86, release binaries (`cargo build --release -p roost -p roost-agent`)
//! and the `kernel` and `rootfs-base` artefacts (`roost images build`).

mod support;

use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;
use serde_json::{Value, json};
use support::{
    ROOST, Signal, http, http_host, signal_server, start_control_for_host_vm, tail, tenant_api_key,
    wait_for_worker_offering,
};

const DOMAIN: &str = "roost.test";
const INTERNAL_TOKEN: &str = "worker-host-vm-internal-token-0123456789";
/// Template build plus worker start inside the host VM.
const JOIN_WITHIN: Duration = Duration::from_secs(1500);

const SCRIPT: &str = r#"
result() { echo "RESULT $1 $2"; }
RT=/tmp/worker-rt
WD=/tmp/worker-data
roost_procs() {
  for d in /proc/[0-9]*; do
    c=$(tr '\0' ' ' < $d/cmdline 2>/dev/null)
    set -- $c
    case "$1 $2 $3" in roost" "*" run"|*/roost" "*" run")
      case "$2" in vm|sandbox) echo "${d#/proc/} $c";; esac;;
    esac
  done
}
roost templates build --image base --runtime-root /tmp/build-rt --ready-timeout 240 \
    > /tmp/build.out 2>/tmp/build.err
result build $?
worker() { # N [ARGS...]
  n=$1; shift
  RUST_LOG=info,roost_worker=debug roost serve worker --control-url http://10.0.2.2:$API_PORT \
      --data-dir $WD --runtime-root $RT --template base --ready-timeout 240 --max-backoff 5s \
      --gateway 10.0.2.2:$TUNNEL_PORT --gateway-ca /tmp/gateway-ca.pem \
      --cgroup-parent roost-worker "$@" > /tmp/worker$n.out 2>/tmp/worker$n.err &
}
metric() { # NAME: its value for the base template's pool on the restarted worker
  wget -q -O - http://127.0.0.1:9464/metrics 2>/dev/null \
    | sed -n "s/^$1{template=\"base\"} //p"
}
worker 1
W=$!
# The test drives control's API and says on its signal port what comes next: `crash` once a
# sandbox runs, `done` once another runs on the restarted worker.
await() {
  i=0
  until wget -q -O - http://10.0.2.2:$SIGNAL_PORT/ 2>/dev/null | grep -q "$1"; do
    i=$((i+1))
    if [ $i -gt 2400 ]; then result signal-$1 timeout; break; fi
    sleep 1
  done
}
await crash
result running-vmms "$(roost_procs | wc -l)"
result running-cgroups "$(ls -d /sys/fs/cgroup/roost-worker/cl-* 2>/dev/null | wc -l)"
# A crash: the VMM dies with the worker; a restart (credentials reused) clears what is left.
kill -9 $W
wait $W 2>/dev/null
sleep 1
result crash-vmms "$(roost_procs | wc -l)"
result crash-leftover "$(find $RT -mindepth 1 -maxdepth 1 | wc -l)"
# The restarted worker keeps one warm clone: the next create takes it (a pool hit), a
# background restore refills the pool, and SIGTERM must free both VMs.
worker 2 --pool 1 --pool-memory-mib 512 --metrics-addr 127.0.0.1:9464
W=$!
i=0
until grep -q 'joined control' /tmp/worker2.out && [ "$(metric roost_pool_ready_clones)" = 1 ]; do
  i=$((i+1))
  if [ $i -gt 240 ]; then result rejoined timeout; break; fi
  sleep 1
done
# The warm clone's directory (pool-*) is new; anything else is the killed worker's.
result restart-leftover "$(find $RT -mindepth 1 -maxdepth 1 ! -name 'pool-*' | wc -l)"
result restart-cgroups "$(ls -d /sys/fs/cgroup/roost-worker/cl-* 2>/dev/null | wc -l)"
result restart-registered "$(grep -c 'registered as' /tmp/worker2.out)"
wget -q -O - http://10.0.2.2:$SIGNAL_PORT/rejoined > /dev/null 2>&1
await done
result pool-hits "$(metric roost_pool_hits_total)"
i=0
until [ "$(metric roost_pool_ready_clones)" = 1 ]; do
  i=$((i+1)); [ $i -gt 240 ] && break; sleep 1
done
result pool-refilled "$(metric roost_pool_ready_clones)"
result running-vmms-2 "$(roost_procs | wc -l)"
kill -TERM $W
i=0
while kill -0 $W 2>/dev/null; do
  i=$((i+1))
  if [ $i -gt 120 ]; then result worker-stop timeout; kill -9 $W; break; fi
  sleep 1
done
wait $W
result worker-exit $?
result leftover-files "$(find $RT -mindepth 1 | wc -l)"
find $RT -mindepth 1 | sed 's/^/LEFTOVER /'
result leftover-procs "$(roost_procs | wc -l)"
result leftover-cgroups "$(ls -d /sys/fs/cgroup/roost-worker/cl-* 2>/dev/null | wc -l)"
roost_procs | sed 's/^/PROC /'
result paused-left "$(ls $WD/paused | wc -l)"
result snapshots-left "$(ls $WD/snapshots | wc -l)"
result creds-mode "$(stat -c %a $WD/worker-credentials.json)"
sed 's/^/WORKER-OUT /' /tmp/worker1.out /tmp/worker2.out
sed 's/^/WORKER-ERR /' /tmp/worker1.err | tail -n 200
sed 's/^/WORKER2-ERR /' /tmp/worker2.err | tail -n 60
sed 's/^/BUILD-ERR /' /tmp/build.err | tail -n 40
"#;

fn api_key(key: &str) -> String {
    format!("x-api-key: {key}\r\n")
}

/// A running `roost serve gateway` (plain HTTP listener, tunnel endpoint for the worker).
struct Gateway {
    child: Child,
    http: SocketAddr,
}

impl Gateway {
    fn start(
        dir: &std::path::Path,
        control: SocketAddr,
        worker_ca: &std::path::Path,
        tunnel_port: u16,
    ) -> Self {
        let free = || {
            TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
        };
        let (http, metrics) = (free(), free());
        let child = Command::new(ROOST)
            .args(["serve", "gateway", "--domain", DOMAIN])
            .args(["--listen-http", &http.to_string()])
            .args(["--listen-metrics", &metrics.to_string()])
            .args(["--control-url", &format!("http://{control}")])
            .args(["--internal-token", INTERNAL_TOKEN])
            .args(["--tunnel-listen", &format!("127.0.0.1:{tunnel_port}")])
            .arg("--worker-ca")
            .arg(worker_ca)
            .arg("--tunnel-cert")
            .arg(dir.join("gateway.pem"))
            .arg("--tunnel-key")
            .arg(dir.join("gateway.key"))
            .arg("--data-dir")
            .arg(dir.join("gateway-data"))
            .args(["--threads", "2"])
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("gateway.log")).unwrap())
            .spawn()
            .expect("spawn roost serve gateway");
        let deadline = Instant::now() + Duration::from_secs(60);
        while TcpStream::connect(http).is_err() {
            assert!(
                Instant::now() < deadline,
                "the gateway never listened on {http}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { child, http }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// envd's `/envs` in sandbox `id`, through the gateway and the worker's tunnel.
fn envs_through_gateway(gateway: SocketAddr, id: &str) -> (u16, Value) {
    http_host(
        gateway,
        &format!("49983-{id}.{DOMAIN}"),
        "GET",
        "/envs",
        "",
        None,
    )
}

/// envd's `/envs` through the gateway once it answers 200 (bounded: the tunnel may come up
/// just after the worker joined).
fn wait_envs(gateway: SocketAddr, id: &str) -> Result<Value, String> {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let (status, envs) = envs_through_gateway(gateway, id);
        if status == 200 {
            return Ok(envs);
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "envd of {id} never answered through the gateway: {status} {envs}"
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// What the test saw through control's API.
#[derive(Debug, Default)]
struct Seen {
    log: Vec<String>,
}

impl Seen {
    fn note(&mut self, line: String) {
        eprintln!("worker_in_host_vm: {line}");
        self.log.push(line);
    }
}

fn state_of(api: SocketAddr, key: &str, id: &str) -> String {
    let (status, body) = http(
        api,
        "GET",
        &format!("/v1/sandboxes/{id}"),
        &api_key(key),
        None,
    );
    assert_eq!(status, 200, "{body}");
    body["state"].as_str().unwrap_or("").to_owned()
}

/// The whole API conversation; the second sandbox is left running for the worker's SIGTERM.
fn drive(
    api: SocketAddr,
    gateway: SocketAddr,
    seen: &mut Seen,
    script_done: &AtomicBool,
) -> Result<String, String> {
    let key = tenant_api_key(api, "dev@example.com")?;
    // Wait for the worker (after the template build inside the host VM).
    let host = wait_for_worker_offering(api, "base", JOIN_WITHIN, script_done)?;
    seen.note(format!("worker joined: {host}"));

    let timed = |seen: &mut Seen, what: &str, method: &str, path: &str, body: Option<Value>| {
        let started = Instant::now();
        let (status, reply) = http(api, method, path, &api_key(&key), body);
        seen.note(format!(
            "{what}: {status} in {} ms: {reply}",
            started.elapsed().as_millis()
        ));
        (status, reply)
    };
    let (status, created) = timed(
        seen,
        "create",
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "base", "timeout": 3600, "envVars": {"ROOST_TEST": "hello"}})),
    );
    if status != 201 {
        return Err(format!("create: {status} {created}"));
    }
    let id = created["sandboxID"].as_str().unwrap().to_owned();
    let state = state_of(api, &key, &id);
    if state != "running" {
        return Err(format!("after create: state {state}"));
    }
    let (status, metrics) = timed(
        seen,
        "metrics",
        "GET",
        &format!("/sandboxes/{id}/metrics"),
        None,
    );
    if status != 200 || metrics[0]["memUsed"].as_u64().unwrap_or(0) == 0 {
        return Err(format!("metrics: {status} {metrics}"));
    }
    // The tunnel may come up just after the worker joined.
    let envs = wait_envs(gateway, &id)?;
    seen.note(format!("envs through the gateway: {envs}"));
    if envs["ROOST_TEST"] != "hello" {
        return Err(format!("envd has not the sandbox's env vars: {envs}"));
    }
    for cycle in 1..=2 {
        let (status, body) = timed(
            seen,
            &format!("pause {cycle}"),
            "POST",
            &format!("/sandboxes/{id}/pause"),
            None,
        );
        if status != 204 {
            return Err(format!("pause {cycle}: {status} {body}"));
        }
        let state = state_of(api, &key, &id);
        if state != "paused" {
            return Err(format!("after pause {cycle}: state {state}"));
        }
        if cycle == 1 {
            let (status, body) = timed(
                seen,
                "resume 1",
                "POST",
                &format!("/sandboxes/{id}/resume"),
                Some(json!({"timeout": 3600})),
            );
            if status != 201 {
                return Err(format!("resume 1: {status} {body}"));
            }
        }
        // After an explicit resume the route is back; on the second cycle the request itself
        // resumes the paused sandbox (the gateway's auto-resume).
        let started = Instant::now();
        let (status, envs) = envs_through_gateway(gateway, &id);
        seen.note(format!(
            "envs through the gateway after pause {cycle}: {status} in {} ms: {envs}",
            started.elapsed().as_millis()
        ));
        if status != 200 || envs["ROOST_TEST"] != "hello" {
            return Err(format!("envs after pause {cycle}: {status} {envs}"));
        }
        let state = state_of(api, &key, &id);
        if state != "running" {
            return Err(format!("after resume {cycle}: state {state}"));
        }
    }
    // A snapshot becomes a template: a sandbox created from it has the first one's memory
    // (envd still holds ROOST_TEST, which this create does not set).
    let (status, snapshot) = timed(
        seen,
        "snapshot",
        "POST",
        &format!("/sandboxes/{id}/snapshots"),
        Some(json!({})),
    );
    if status != 201 {
        return Err(format!("snapshot: {status} {snapshot}"));
    }
    let snapshot_id = snapshot["snapshotID"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let (status, clone) = timed(
        seen,
        "create from the snapshot",
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": snapshot_id, "timeout": 3600})),
    );
    if status != 201 {
        return Err(format!("create from the snapshot: {status} {clone}"));
    }
    let clone_id = clone["sandboxID"].as_str().unwrap_or_default().to_owned();
    let envs = wait_envs(gateway, &clone_id)?;
    seen.note(format!("envs of the snapshot's clone: {envs}"));
    if envs["ROOST_TEST"] != "hello" {
        return Err(format!("the clone lacks the snapshot's memory: {envs}"));
    }
    let (status, body) = timed(
        seen,
        "kill the clone",
        "DELETE",
        &format!("/sandboxes/{clone_id}"),
        None,
    );
    if status != 204 {
        return Err(format!("kill the clone: {status} {body}"));
    }
    let (status, body) = timed(
        seen,
        "delete the snapshot template",
        "DELETE",
        &format!("/templates/{snapshot_id}"),
        None,
    );
    if status != 204 {
        return Err(format!("delete template: {status} {body}"));
    }
    let (status, second) = timed(
        seen,
        "create second",
        "POST",
        "/v2/sandboxes",
        Some(json!({"templateID": "base", "timeout": 3600})),
    );
    if status != 201 {
        return Err(format!("second create: {status} {second}"));
    }
    let (status, body) = timed(seen, "kill", "DELETE", &format!("/sandboxes/{id}"), None);
    if status != 204 {
        return Err(format!("kill: {status} {body}"));
    }
    let (status, _) = http(
        api,
        "GET",
        &format!("/v1/sandboxes/{id}"),
        &api_key(&key),
        None,
    );
    seen.note(format!("after kill: GET {status}"));
    Ok(key)
}

/// After the worker's crash and restart: one more sandbox, left running for the SIGTERM.
fn after_restart(
    api: SocketAddr,
    key: &str,
    signal: &Signal,
    seen: &mut Seen,
    script_done: &AtomicBool,
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(600);
    while !signal.asked("/rejoined") {
        if Instant::now() >= deadline || script_done.load(Ordering::SeqCst) {
            return Err("the restarted worker never re-joined".into());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Control may still be replacing the dead session: bounded retries.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let started = Instant::now();
        let (status, body) = http(
            api,
            "POST",
            "/v2/sandboxes",
            &api_key(key),
            Some(json!({"templateID": "base", "timeout": 3600})),
        );
        seen.note(format!(
            "create after the restart: {status} in {} ms: {body}",
            started.elapsed().as_millis()
        ));
        if status == 201 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("create after the restart: {status} {body}"));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn worker_in_host_vm_creates_pauses_resumes_and_kills_through_control() {
    let data = tempfile::tempdir().unwrap();
    let (control, api, token) =
        start_control_for_host_vm(data.path(), &["--internal-token", INTERNAL_TOKEN]);

    let certs = tempfile::tempdir().unwrap();
    let out = Command::new(ROOST)
        .args(["certs", "init", "--domain", DOMAIN, "--out"])
        .arg(certs.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tunnel_port = UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let gateway = Gateway::start(
        certs.path(),
        api,
        &data.path().join("worker-ca.pem"),
        tunnel_port,
    );
    let gateway_http = gateway.http;
    let ca = certs.path().join("ca.pem");

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
                .env("TUNNEL_PORT", tunnel_port.to_string())
                .file("/tmp/gateway-ca.pem", ca)
                .env("ROOST_WORKER_TOKEN", token),
            SCRIPT,
            &["kernel", "rootfs-base"],
        );
        finished.store(true, Ordering::SeqCst);
        run
    });

    let mut seen = Seen::default();
    let outcome = drive(api, gateway_http, &mut seen, &script_done).and_then(|key| {
        signal.set("crash");
        after_restart(api, &key, &signal, &mut seen, &script_done)
    });
    signal.set("done");
    let run = vm.join().unwrap().unwrap_or_else(|e| {
        panic!("host VM run (needs release binaries: cargo build --release -p roost): {e:#?}")
    });
    let all = format!(
        "{}\nAPI log:\n{}\ncontrol stderr (tail):\n{}",
        run.transcript(),
        seen.log.join("\n"),
        tail(&control.stderr.lock().unwrap(), 6000),
    );
    let all = format!(
        "{all}\ngateway log (tail):\n{}",
        tail(
            &std::fs::read_to_string(certs.path().join("gateway.log")).unwrap_or_default(),
            4000
        )
    );
    drop(gateway);
    if let Err(e) = outcome {
        panic!("{e}\n{all}");
    }
    let get = |key: &str| run.expect_result(key).to_owned();
    assert_eq!(get("build"), "0", "the base template builds; {all}");
    assert_eq!(
        get("running-vmms"),
        "1",
        "the second sandbox's VMM runs before SIGTERM; {all}"
    );
    assert_eq!(
        get("running-cgroups"),
        "1",
        "the running sandbox's VMM has its cgroup; {all}"
    );
    assert_eq!(
        get("crash-vmms"),
        "0",
        "VMMs die with a killed worker; {all}"
    );
    assert_eq!(
        get("crash-leftover"),
        "1",
        "a killed worker leaves its runtime directory; {all}"
    );
    assert_eq!(get("restart-leftover"), "0", "a restart removes it; {all}");
    assert_eq!(
        get("restart-cgroups"),
        "0",
        "a restart removes stale cgroups; {all}"
    );
    assert_eq!(
        get("restart-registered"),
        "0",
        "a restart reuses the credentials; {all}"
    );
    assert_eq!(
        get("pool-hits"),
        "1",
        "the create on the restarted worker took its warm clone; {all}"
    );
    assert_eq!(get("pool-refilled"), "1", "the pool refills; {all}");
    assert_eq!(
        get("running-vmms-2"),
        "2",
        "a sandbox and the refilled warm clone run on the restarted worker before SIGTERM; {all}"
    );
    assert_eq!(get("worker-exit"), "0", "SIGTERM stops the worker; {all}");
    assert_eq!(
        get("leftover-cgroups"),
        "0",
        "no sandbox cgroup left; {all}"
    );
    assert_eq!(
        get("leftover-files"),
        "0",
        "the runtime root is empty; {all}"
    );
    assert_eq!(get("leftover-procs"), "0", "no VMM left; {all}");
    assert_eq!(
        get("paused-left"),
        "0",
        "the killed sandbox's snapshots are gone; {all}"
    );
    assert_eq!(
        get("snapshots-left"),
        "0",
        "the deleted template is gone; {all}"
    );
    assert_eq!(get("creds-mode"), "600", "credentials are private; {all}");
    assert_eq!(run.exit_code, 0, "{all}");
}
