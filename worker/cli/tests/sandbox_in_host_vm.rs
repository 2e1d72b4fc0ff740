//! `roost sandbox run` (the worker's `VmHandle` under a CLI) on real KVM: inside the host VM
//! one script boots sandboxes from the artefact index and checks output and exit status, exit
//! code propagation, a guest kernel panic and an unbootable rootfs reported as boot failures, a
//! VMM killed from outside while a command runs, and that afterwards no runtime files and no
//! roost processes are left.
//!
//! Needs qemu-system-x86, release binaries (`cargo build --release -p roost`) and the `kernel`
//! and `rootfs-base` artefacts (`roost images build`); without them it fails with a message.

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;

const SCRIPT: &str = r#"
result() { echo "RESULT $1 $2"; }
RT=/tmp/rt
SB="timeout 150 roost sandbox run --runtime-root $RT --ready-timeout 120"
# Processes that are a roost VMM or sandbox CLI (argv: .../roost vm|sandbox run ...).
roost_procs() {
  for d in /proc/[0-9]*; do
    c=$(tr '\0' ' ' < $d/cmdline 2>/dev/null)
    set -- $c
    case "$1 $2 $3" in roost" "*" run"|*/roost" "*" run")
      case "$2" in vm|sandbox) echo "${d#/proc/} $c";; esac;;
    esac
  done
}

$SB -- echo hi > /tmp/echo.out 2>/tmp/echo.err
result echo $?
result echo-out "$(cat /tmp/echo.out)"
result echo-ready "$(grep -c 'roost: sandbox ready in [0-9]* ms' /tmp/echo.err)"
result echo-stop "$(grep -c 'roost: the VM stopped: the guest shut down' /tmp/echo.err)"
grep 'ready in' /tmp/echo.err | sed 's/^/TIMING /'

$SB --cpus 2 --mem 512 -- sh -c 'echo to-stderr >&2; nproc; exit 42' > /tmp/exit.out 2>/tmp/exit.err
result exit $?
result exit-out "$(cat /tmp/exit.out)"
result exit-stderr "$(grep -c '^to-stderr$' /tmp/exit.err)"

$SB --append init=/nonexistent -- true > /dev/null 2>/tmp/panic.err
result panic $?

head -c 8388608 /dev/zero > /tmp/junk.img
$SB --rootfs /tmp/junk.img -- true > /dev/null 2>/tmp/badroot.err
result badroot $?
rm -f /tmp/junk.img

# Without `timeout` in front: the signals below go to the sandbox CLI itself.
SBX="roost sandbox run --runtime-root $RT --ready-timeout 240"
wait_for() { # FILE PATTERN: until PATTERN appears in FILE (at most 120 s)
  i=0; until grep -q "$2" "$1" 2>/dev/null; do i=$((i+1)); [ $i -lt 600 ] || break; usleep 200000; done
}
# The command starts a server in the background and ends; the VM stays up for the forward.
$SBX --forward 9000:8000 -- sh -c \
    'python3 -m http.server 8000 --bind 127.0.0.1 --directory /etc > /dev/null 2>&1 &' \
    > /dev/null 2>/tmp/forward.err &
S=$!
( sleep 400; kill -9 $S 2>/dev/null ) &
WATCHDOG=$!
wait_for /tmp/forward.err 'serving forwards until Ctrl-C'
i=0
until wget -qO /tmp/hostname.txt http://127.0.0.1:9000/hostname 2>/dev/null; do
  i=$((i+1)); [ $i -lt 240 ] || break; usleep 500000
done
result http "$(cat /tmp/hostname.txt 2>/dev/null)"
kill -INT $S
wait $S
result forward-exit $?
kill $WATCHDOG 2>/dev/null

# SIGTERM while a command runs: the command is killed, the VM still shut down cleanly.
$SBX -- sleep 600 > /dev/null 2>/tmp/term.err &
S=$!
( sleep 400; kill -9 $S 2>/dev/null ) &
WATCHDOG=$!
wait_for /tmp/term.err 'ready in'
usleep 500000
kill -TERM $S
wait $S
result term-exit $?
kill $WATCHDOG 2>/dev/null

$SB -- sleep 600 > /tmp/kill.out 2>/tmp/kill.err &
S=$!
i=0
until grep -q 'ready in' /tmp/kill.err 2>/dev/null; do
  i=$((i+1)); [ $i -lt 1200 ] || break; usleep 200000
done
usleep 500000
VMM=$(roost_procs | grep 'roost vm run ' | cut -d' ' -f1)
result kill-found "$(echo $VMM | wc -w)"
kill -9 $VMM
wait $S
result killed $?

result leftover-files "$(find $RT -mindepth 1 | wc -l)"
find $RT -mindepth 1 | sed 's/^/LEFTOVER /'
result leftover-procs "$(roost_procs | wc -l)"
roost_procs | sed 's/^/PROC /'
for f in /tmp/*.err; do sed "s|^|STDERR $(basename $f .err): |" "$f"; done
"#;

#[test]
fn sandbox_run_in_host_vm_runs_commands_and_frees_everything() {
    let run = ScriptRun::run(
        HostVm::builder()
            .timeout(roost_hostvm::script::TEST_LIMIT)
            .mem_mib(4096),
        SCRIPT,
        &["kernel", "rootfs-base"],
    )
    .unwrap_or_else(|e| {
        panic!("host VM run (needs release binaries: cargo build --release -p roost): {e:#?}")
    });
    let all = run.transcript();
    let get = |key: &str| run.expect_result(key);
    let stderr_of = |name: &str| run.lines_after(&format!("STDERR {name}: "));

    assert_eq!(get("echo"), "0", "{all}");
    assert_eq!(get("echo-out"), "hi", "{all}");
    assert_eq!(get("echo-ready"), "1", "boot-to-ready time printed; {all}");
    assert_eq!(get("echo-stop"), "1", "a clean power-off; {all}");

    assert_eq!(get("exit"), "42", "the command's exit code; {all}");
    assert_eq!(get("exit-out"), "2", "two vCPUs; {all}");
    assert_eq!(get("exit-stderr"), "1", "stderr streamed; {all}");

    assert_eq!(get("panic"), "1", "{all}");
    let panic = stderr_of("panic");
    assert!(
        panic.contains("the guest kernel panicked (VMM exit 3)"),
        "a panic is reported as such; {all}"
    );
    assert!(panic.contains("Kernel panic"), "with the panic line; {all}");

    assert_eq!(get("badroot"), "1", "{all}");
    assert!(
        stderr_of("badroot").contains("the VMM exited before the agent was ready"),
        "{all}"
    );

    assert_eq!(
        get("http"),
        "roost",
        "GET /hostname through --forward; {all}"
    );
    assert_eq!(
        get("forward-exit"),
        "0",
        "Ctrl-C ends the forwarding and the sandbox; {all}"
    );
    assert!(
        stderr_of("forward").contains("the VM stopped: the guest shut down"),
        "{all}"
    );
    assert_eq!(get("term-exit"), "137", "SIGTERM kills the command; {all}");
    assert!(
        stderr_of("term").contains("the VM stopped: the guest shut down"),
        "and the VM is still shut down cleanly; {all}"
    );

    assert_eq!(get("kill-found"), "1", "one VMM process found; {all}");
    assert_eq!(get("killed"), "1", "the CLI fails when its VMM dies; {all}");
    assert!(
        stderr_of("kill").contains("the VMM was killed by signal 9 (SIGKILL)"),
        "the CLI says what happened; {all}"
    );

    assert_eq!(get("leftover-files"), "0", "no runtime files left; {all}");
    assert_eq!(get("leftover-procs"), "0", "no roost processes left; {all}");
    assert_eq!(run.exit_code, 0, "{all}");
}
