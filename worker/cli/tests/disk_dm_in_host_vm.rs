//! The dm-snapshot disk backend (`roost disk dm`, `roost_worker::disk`) on a real kernel with
//! real KVM, inside the host VM: a snapshot device over the `rootfs-base` block device boots a
//! VM writable; a file the guest writes and syncs is there when a second VM boots from the
//! same device, and not in the base image (a third VM boots the base read-only); removing the
//! device leaves no `roost-` dm device and no loop device, and recreating it over the same COW
//! file gives the same disk back; devices left behind (a simulated
//! crash: created, never removed) are removed by `roost disk dm clean`; bad input and a
//! missing device are refused with clear errors.
//!
//! Needs qemu-system-x86, release binaries (`cargo build --release -p roost -p
//! roost-agent-client`) and the `kernel` and `rootfs-base` artefacts (`roost images build`).

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;

const SCRIPT: &str = r#"
result() { echo "RESULT $1 $2"; }
K=$(sed -n 's/.*"path": "\(.*\)".*/\1/p' $ROOST_CACHE_DIR/index/kernel.json)
R=$(sed -n 's/.*"path": "\(.*\)".*/\1/p' $ROOST_CACHE_DIR/index/rootfs-base.json)
W=/tmp/dm
mkdir -p $W
for m in loop dm_mod dm_snapshot; do modprobe $m 2>/dev/null; done
result base-is-block "$([ -b "$R" ] && echo yes || echo no)"

# roost- dm devices and loop devices backed by a file under $W, from sysfs (no udev, no
# dmsetup needed).
roost_dms() {
  for d in /sys/block/dm-*; do
    [ -e $d/dm/name ] || continue
    case "$(cat $d/dm/name)" in roost-*) echo "$(basename $d) $(cat $d/dm/name)";; esac
  done
}
our_loops() {
  for l in /sys/block/loop*; do
    [ -e $l/loop/backing_file ] || continue
    case "$(cat $l/loop/backing_file)" in $W/*) echo "$(basename $l) $(cat $l/loop/backing_file)";; esac
  done
}
running() { # PID: the background job has not ended (a zombie has ended)
  s=$(cut -d' ' -f3 /proc/$1/stat 2>/dev/null); [ -n "$s" ] && [ "$s" != Z ]
}
diag() { # NAME: what a failed boot leaves to look at
  tail -20 $W/$1/err 2>&1 | sed "s/^/DIAG $1 err: /"
  tail -30 $W/$1/serial.log 2>&1 | sed "s/^/DIAG $1 serial: /"
}
boot() { # NAME VMM-ARGS...: start a VMM in the background (pid in VMM), wait for its agent
  n=$1; shift
  mkdir -p $W/$n
  roost vm run --kernel $K --vsock-uds $W/$n/v.sock --serial-log $W/$n/serial.log "$@" \
    > $W/$n/out 2> $W/$n/err &
  VMM=$!
  end=$(( $(date +%s) + 300 ))
  until timeout 10 roost-agent-ctl --vsock-uds $W/$n/v.sock health > /dev/null 2>&1; do
    running $VMM || { echo "DIAG $n: the VMM ended before the agent answered"; diag $n; return 2; }
    [ $(date +%s) -lt $end ] || { echo "DIAG $n: no agent within 300 s"; diag $n; return 1; }
    usleep 500000
  done
}
agent() { # NAME CMD...: run CMD in VM NAME (at most 120 s)
  n=$1; shift
  timeout 120 roost-agent-ctl --vsock-uds $W/$n/v.sock exec -- "$@"
}
stop_vm() { # NAME: power the guest off and wait for the VMM (SIGKILL after 60 s); its status
  timeout 30 roost-agent-ctl --vsock-uds $W/$1/v.sock exec -- roost-agent poweroff > /dev/null 2>&1
  end=$(( $(date +%s) + 60 ))
  while running $VMM && [ $(date +%s) -lt $end ]; do usleep 200000; done
  running $VMM && { echo "DIAG $1: still running 60 s after poweroff; killing it"; kill -9 $VMM; }
  wait $VMM
}

# 1. Create; the device is listed.
DEV=$(timeout 60 roost disk dm create --name t1 --base $R --cow $W/t1.cow 2>/tmp/create.err)
result create $?
cat /tmp/create.err | sed 's/^/STDERR create: /'
result dev-block "$([ -b "$DEV" ] && echo yes || echo no)"
result dev-sysfs-name "$(cat /sys/block/$(basename "$DEV")/dm/name 2>/dev/null)"
timeout 60 roost disk dm list > /tmp/list.out 2>&1
result list "$(cut -d' ' -f1,2 /tmp/list.out)"
sed 's/^/LIST /' /tmp/list.out
result list-loops "$(grep -c ' loops=/dev/loop' /tmp/list.out)"
result cow-loops "$(our_loops | wc -l)"
sectors() { cat /sys/class/block/$(basename "$(readlink -f "$1")")/size 2>/dev/null; }
echo "SIZES dev=$(sectors "$DEV") base=$(sectors "$R")"
result dev-size-matches "$([ -n "$(sectors "$R")" ] && [ "$(sectors "$DEV")" = "$(sectors "$R")" ] && echo yes || echo no)"

# 2. A VM boots writable from it, writes and syncs a file, powers off.
boot w1 --rootfs "$DEV"; result w1-ready $?
result w1-write "$(agent w1 sh -c 'echo dm-hello > /marker && sync && cat /marker' 2>&1)"
stop_vm w1; result w1-exit $?
result cow-used "$([ "$(du -k $W/t1.cow | cut -f1)" -gt 0 ] && echo yes || echo no)"

# 3. A second VM from the same device sees the file.
boot w2 --rootfs "$DEV"; result w2-ready $?
result w2-read "$(agent w2 cat /marker 2>&1)"
stop_vm w2; result w2-exit $?

# 4. The base image does not have it.
boot b1 --rootfs "$R" --rootfs-ro; result b1-ready $?
result base-read "$(agent b1 sh -c 'test -e /marker && echo present || echo absent' 2>&1)"
stop_vm b1; result b1-exit $?

# 5. Remove: no dm device, no loop device left; the COW file stays.
timeout 60 roost disk dm remove --name t1 > /tmp/remove.out 2>&1
result remove $?
sed 's/^/REMOVE /' /tmp/remove.out
result after-remove-dms "$(roost_dms | wc -l)"
result after-remove-loops "$(our_loops | wc -l)"
result cow-kept "$([ -f $W/t1.cow ] && echo yes || echo no)"

# 6. The store is persistent: the same base and COW file make the same disk again.
DEV=$(timeout 60 roost disk dm create --name t1 --base $R --cow $W/t1.cow)
result recreate $?
boot w3 --rootfs "$DEV"; result w3-ready $?
result w3-read "$(agent w3 cat /marker 2>&1)"
stop_vm w3; result w3-exit $?
timeout 60 roost disk dm remove --name t1 > /dev/null; result remove2 $?
timeout 60 roost disk dm remove --name t1 > /dev/null 2>/tmp/again.err
result remove-again $?
sed 's/^/STDERR again: /' /tmp/again.err

# 7. A simulated crash: devices created and never removed (the CLI that made them is gone);
# one of them was in use by a VMM killed with SIGKILL. `clean` removes them and their loops.
timeout 60 roost disk dm create --name crash-a --base $R --cow $W/a.cow > /dev/null
timeout 60 roost disk dm create --name crash-b --base $R --cow $W/b.cow > /tmp/b.dev
boot k1 --rootfs "$(cat /tmp/b.dev)"; result k1-ready $?
kill -9 $VMM; wait $VMM
result before-clean-dms "$(roost_dms | wc -l)"
result before-clean-loops "$(our_loops | wc -l)"
timeout 120 roost disk dm clean > /tmp/clean.out 2>&1
result clean $?
sed 's/^/CLEAN /' /tmp/clean.out
result clean-lines "$(grep -c '^removed roost-crash-[ab] loops=/dev/loop' /tmp/clean.out)"
result after-clean-dms "$(roost_dms | wc -l)"
result after-clean-loops "$(our_loops | wc -l)"
result clean-again "$(timeout 60 roost disk dm clean 2>&1 | wc -l)"
result list-empty "$(timeout 60 roost disk dm list 2>&1 | wc -l)"

# 8. Bad input is refused before anything is made.
timeout 60 roost disk dm create --name 'a/b' --base $R --cow $W/bad.cow > /dev/null 2>/tmp/badname.err
result bad-name $?
sed 's/^/STDERR badname: /' /tmp/badname.err
result bad-name-cow "$([ -e $W/bad.cow ] && echo yes || echo no)"
timeout 60 roost disk dm create --name nobase --base /nonexistent --cow $W/bad.cow > /dev/null 2>/tmp/nobase.err
result no-base $?
sed 's/^/STDERR nobase: /' /tmp/nobase.err
# Chosen per sandbox: `roost sandbox run --disk dm|overlay` gives the sandbox a writable root
# over the shared image and removes it (device, loops, COW file) when the sandbox ends.
for backend in dm overlay; do
  timeout 300 roost sandbox run --runtime-root /tmp/sb-rt --disk $backend --ready-timeout 240 -- \
    sh -c "echo $backend-root > /written-by-sandbox && sync && cat /written-by-sandbox" \
    > /tmp/sb-$backend.out 2>/tmp/sb-$backend.err
  result sandbox-$backend-exit $?
  result sandbox-$backend-out "$(cat /tmp/sb-$backend.out)"
  result sandbox-$backend-left "$(find /tmp/sb-rt -mindepth 1 | wc -l) $(roost_dms | wc -l) $(our_loops | wc -l)"
  tail -5 /tmp/sb-$backend.err | sed "s/^/SANDBOX-$backend /"
done
result final-dms "$(roost_dms | wc -l)"
result final-loops "$(our_loops | wc -l)"
"#;

#[test]
fn dm_disks_in_host_vm_boot_writable_persist_and_leave_nothing() {
    let run = ScriptRun::run(
        HostVm::builder()
            .timeout(roost_hostvm::script::TEST_LIMIT)
            .mem_mib(2048),
        SCRIPT,
        &["kernel", "rootfs-base"],
    )
    .unwrap_or_else(|e| {
        panic!(
            "host VM run (needs release binaries: cargo build --release -p roost -p \
             roost-agent-client): {e:#?}"
        )
    });
    let all = run.transcript();
    let get = |key: &str| run.expect_result(key);

    assert_eq!(get("base-is-block"), "yes", "{all}");
    assert_eq!(get("create"), "0", "{all}");
    assert_eq!(
        get("dev-block"),
        "yes",
        "create prints a block device; {all}"
    );
    assert_eq!(get("dev-sysfs-name"), "roost-t1", "{all}");
    assert!(
        get("list").starts_with("roost-t1 /dev/dm-"),
        "list names the device and its node; {all}"
    );
    assert_eq!(get("list-loops"), "1", "and its COW loop device; {all}");
    assert_eq!(
        get("cow-loops"),
        "1",
        "one loop: the base is a block device; {all}"
    );
    assert_eq!(get("dev-size-matches"), "yes", "{all}");

    assert_eq!(get("w1-ready"), "0", "{all}");
    assert_eq!(get("w1-write"), "dm-hello", "{all}");
    assert_eq!(get("w1-exit"), "0", "a clean power-off; {all}");
    assert_eq!(
        get("cow-used"),
        "yes",
        "the writes went to the COW file; {all}"
    );
    assert_eq!(get("w2-ready"), "0", "{all}");
    assert_eq!(get("w2-read"), "dm-hello", "the disk kept the file; {all}");
    assert_eq!(get("w2-exit"), "0", "{all}");
    assert_eq!(get("b1-ready"), "0", "{all}");
    assert_eq!(
        get("base-read"),
        "absent",
        "the base was not written; {all}"
    );
    assert_eq!(get("b1-exit"), "0", "{all}");

    assert_eq!(get("remove"), "0", "{all}");
    assert_eq!(get("after-remove-dms"), "0", "no dm device left; {all}");
    assert_eq!(get("after-remove-loops"), "0", "no loop device left; {all}");
    assert_eq!(get("cow-kept"), "yes", "{all}");
    assert_eq!(get("recreate"), "0", "{all}");
    assert_eq!(get("w3-ready"), "0", "{all}");
    assert_eq!(
        get("w3-read"),
        "dm-hello",
        "the persistent store survives the device; {all}"
    );
    assert_eq!(get("w3-exit"), "0", "{all}");
    assert_eq!(get("remove2"), "0", "{all}");
    assert_eq!(get("remove-again"), "1", "{all}");
    assert!(
        run.lines_after("STDERR again: ")
            .contains("cannot remove dm disk roost-t1: there is no dm device roost-t1"),
        "{all}"
    );

    assert_eq!(get("k1-ready"), "0", "{all}");
    assert_eq!(get("before-clean-dms"), "2", "{all}");
    assert_eq!(get("before-clean-loops"), "2", "{all}");
    assert_eq!(get("clean"), "0", "{all}");
    assert_eq!(get("clean-lines"), "2", "one line per device; {all}");
    assert_eq!(get("after-clean-dms"), "0", "{all}");
    assert_eq!(get("after-clean-loops"), "0", "{all}");
    assert_eq!(get("clean-again"), "0", "nothing left to clean; {all}");
    assert_eq!(get("list-empty"), "0", "{all}");

    assert_eq!(get("bad-name"), "1", "{all}");
    assert!(
        run.lines_after("STDERR badname: ")
            .contains("invalid disk name"),
        "{all}"
    );
    assert_eq!(get("bad-name-cow"), "no", "nothing made; {all}");
    assert_eq!(get("no-base"), "1", "{all}");
    assert!(
        run.lines_after("STDERR nobase: ")
            .contains("cannot use base image /nonexistent"),
        "{all}"
    );
    for backend in ["dm", "overlay"] {
        assert_eq!(get(&format!("sandbox-{backend}-exit")), "0", "{all}");
        assert_eq!(
            get(&format!("sandbox-{backend}-out")),
            format!("{backend}-root"),
            "a writable root through {backend}; {all}"
        );
        assert_eq!(
            get(&format!("sandbox-{backend}-left")),
            "0 0 0",
            "no runtime file, dm device or loop device left after a {backend} sandbox; {all}"
        );
    }
    assert_eq!(get("final-dms"), "0", "{all}");
    assert_eq!(get("final-loops"), "0", "{all}");
    assert_eq!(run.exit_code, 0, "{all}");
    eprintln!("{all}");
}
