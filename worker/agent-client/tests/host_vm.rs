//! The channel over real virtio-vsock: inside the host VM (QEMU TCG with emulated SVM, real
//! KVM), `roost vm run` boots the `rootfs-base` image, whose `/sbin/init` is this tree's
//! roost-agent, and `roost-agent-ctl` (this crate's binary) talks to it through the VMM's vsock
//! Unix socket: ready hello, health, exec with exit codes, stdin and 16 MiB of output checked by
//! sha256, a file round trip, an HTTP GET through a port forward, a closed port, power-off.
//!
//! Needs qemu-system-x86, release binaries (`cargo build --release --workspace --bins`) and the
//! `kernel` and `rootfs-base` artefacts built with the current agent (`roost images build`);
//! without them it fails with a message.
//!
//! The VMM runs with its seccomp filters enforced (the default), so bulk traffic through the
//! channel also proves the device thread's allowlist; the script prints any seccomp audit
//! lines (`SECCOMP`) to make a refusal easy to diagnose.

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;

const SCRIPT: &str = r#"
result() { echo "RESULT $1 $2"; }
CTL="timeout 120 roost-agent-ctl --vsock-uds /tmp/vm.sock"
# The worker listens for the hello before the VM boots.
roost-agent-ctl wait-ready --vsock-uds /tmp/vm.sock --timeout 300 > /tmp/hello.json 2>/tmp/wait.err &
W=$!
roost vm run --rootfs-ro --mem 512 --vsock-uds /tmp/vm.sock \
    --serial-log /tmp/vm.log 2>/tmp/vm.err &
V=$!
wait $W
result ready $?
echo "HELLO $(cat /tmp/hello.json)"
$CTL health > /tmp/health.json 2>/tmp/health.err
result health $?
echo "HEALTH $(cat /tmp/health.json)"

$CTL exec -- echo hello from the guest > /tmp/echo.out 2>/tmp/echo.err
result echo $?
result echo-out "$(cat /tmp/echo.out)"
$CTL exec -- sh -c 'echo to-stderr >&2; exit 7' > /tmp/exit.out 2>/tmp/exit.err
result exit $?
result exit-stderr "$(cat /tmp/exit.err)"
echo "piped input" | $CTL exec --stdin -- cat > /tmp/stdin.out 2>/tmp/stdin.err
result stdin "$(cat /tmp/stdin.out)"

$CTL exec -- sh -c 'head -c 16777216 /dev/urandom > /tmp/r; sha256sum /tmp/r | cut -d" " -f1 > /tmp/r.sum; cat /tmp/r' \
    > /tmp/big.out 2>/tmp/big.err
result big $?
result big-size "$(wc -c < /tmp/big.out)"
$CTL read /tmp/r.sum > /tmp/big.sum 2>/tmp/readsum.err
result big-sum "$([ "$(sha256sum /tmp/big.out | cut -d' ' -f1)" = "$(cat /tmp/big.sum)" ] && echo match || echo differ)"

head -c 4194304 /dev/urandom > /tmp/upload
$CTL write --create-dirs /tmp/up/loaded < /tmp/upload 2>/tmp/write.err
result write $?
$CTL read /tmp/up/loaded > /tmp/download 2>/tmp/download.err
result read $?
result roundtrip "$(cmp -s /tmp/upload /tmp/download && echo same || echo different)"
$CTL read /nonexistent > /dev/null 2>/tmp/missing.err
result missing $?

$CTL exec -- python3 -m http.server 8000 --bind 127.0.0.1 --directory /etc > /dev/null 2>/tmp/http.err &
H=$!
$CTL forward 127.0.0.1:9000 8000 2>/tmp/forward.err &
F=$!
i=0
until wget -qO /tmp/hostname.txt http://127.0.0.1:9000/hostname 2>/dev/null; do
  i=$((i+1)); [ $i -lt 120 ] || break; usleep 500000
done
result http "$(cat /tmp/hostname.txt 2>/dev/null)"
kill $F $H 2>/dev/null
$CTL forward 127.0.0.1:9001 8001 2>/tmp/closed.err &
C=$!
usleep 500000
wget -qO /dev/null http://127.0.0.1:9001/ 2>/dev/null
result closed-port $?
kill $C 2>/dev/null

$CTL exec -- roost-agent poweroff > /dev/null 2>&1
wait $V
result vm $?
for f in /tmp/*.err; do sed "s|^|STDERR $(basename $f .err): |" "$f"; done
dmesg | grep -E "audit.*syscall=" | sed 's/.*comm=/SECCOMP comm=/; s/ ip=.*//' | sort | uniq -c
"#;

#[test]
fn agent_channel_over_vsock_in_host_vm() {
    let run = ScriptRun::run(
        HostVm::builder()
            .timeout(roost_hostvm::script::TEST_LIMIT)
            .mem_mib(4096),
        SCRIPT,
        &["kernel", "rootfs-base"],
    )
    .unwrap_or_else(|e| {
        panic!(
            "host VM run (needs release binaries: cargo build --release --workspace --bins): {e:#?}"
        )
    });
    let stdout = &run.stdout;
    let all = run.transcript();
    let get = |key: &str| run.expect_result(key);

    assert_eq!(get("ready"), "0", "the agent announced itself; {all}");
    // Any version: the image's agent may predate this checkout's (ready.rs checks the range).
    assert!(stdout.contains(r#"HELLO {"protocol_version":"#), "{all}");
    assert_eq!(get("health"), "0", "{all}");
    assert!(stdout.contains(r#""memory":{"total_kib":"#), "{all}");
    assert_eq!(get("echo"), "0", "{all}");
    assert_eq!(get("echo-out"), "hello from the guest", "{all}");
    assert_eq!(get("exit"), "7", "the exit code comes back; {all}");
    assert_eq!(get("exit-stderr"), "to-stderr", "{all}");
    assert_eq!(get("stdin"), "piped input", "{all}");
    assert_eq!(get("big"), "0", "{all}");
    assert_eq!(get("big-size"), "16777216", "all 16 MiB arrived; {all}");
    assert_eq!(get("big-sum"), "match", "sha256 of the 16 MiB; {all}");
    assert_eq!(get("write"), "0", "{all}");
    assert_eq!(get("read"), "0", "{all}");
    assert_eq!(get("roundtrip"), "same", "4 MiB file write + read; {all}");
    assert_eq!(get("missing"), "1", "{all}");
    assert!(
        stdout.contains("STDERR missing: roost-agent-ctl: the agent refused: not found"),
        "{all}"
    );
    assert_eq!(
        get("http"),
        "roost",
        "GET /hostname through the forward; {all}"
    );
    assert_ne!(
        get("closed-port"),
        "0",
        "a closed guest port fails the request; {all}"
    );
    assert!(
        stdout.contains("connection refused"),
        "the forwarder says why; {all}"
    );
    assert_eq!(
        get("vm"),
        "0",
        "roost-agent poweroff ends the VM cleanly; {all}"
    );
    assert_eq!(run.exit_code, 0, "{all}");
}
