//! Per-sandbox cgroups on a real cgroup v2 hierarchy: this test boots the host VM (whose
//! `/init` mounts cgroup2 at /sys/fs/cgroup, as root) and runs the `#[ignore]`d probe below
//! there, which creates sandbox groups and puts processes standing in for VMMs into them: a CPU
//! hog is throttled to its quota, a memory hog is stopped at its ceiling, a fork loop at its
//! pids limit, and removal (also of stale groups) kills what is left and leaves no directory.
//!
//! The probe checks behaviour (throttling happened, the OOM killer ran, the fork failed), never
//! how fast anything was.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use roost_hostvm::HostVm;
use roost_hostvm::script::ScriptRun;
use roost_worker::cgroup::{CgroupTree, Limits};

const PROBE_TEST: &str = "probe_cgroups_inside_host_vm";
const MOUNT: &str = "/sys/fs/cgroup";

fn result(key: &str, value: impl std::fmt::Display) {
    println!("RESULT {key} {value}");
}

fn base_limits() -> Limits {
    Limits::for_vm(1, 64)
}

/// Which cgroup (v2 path) a process is in.
fn cgroup_of(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("")
        .to_owned()
}

#[test]
#[ignore = "runs inside the host VM, started by cgroups_in_host_vm"]
fn probe_cgroups_inside_host_vm() {
    let tree = CgroupTree::open(Path::new(MOUNT), "roost").expect("open the roost parent");
    result("io", tree.has_io());

    // CPU: 10% of one CPU; a busy loop for 1.5 s must be throttled.
    let cpu_limits = Limits {
        cpu_percent: Some(10),
        ..base_limits()
    };
    let cpu = tree.create("cl-cpu", &cpu_limits).expect("create cl-cpu");
    let mut command = Command::new("sh");
    command.args(["-c", "while :; do :; done"]);
    cpu.place_on_spawn(&mut command).unwrap();
    let mut hog = command.spawn().expect("spawn the CPU hog");
    result("spawn-placed", cgroup_of(hog.id()) == "/roost/cl-cpu");
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let usage = cpu.usage().unwrap();
    let wall_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
    result("cpu-throttled", usage.cpu_throttled_periods > 0);
    // 10% quota: well under half of the wall time, however noisy the machine.
    result("cpu-held", usage.cpu_usage_us * 2 < wall_us);
    println!("DIAG cpu usage {} us over {wall_us} us", usage.cpu_usage_us);
    let _ = hog.kill();
    let _ = hog.wait();
    cpu.remove().unwrap();
    result("cpu-removed", !cpu.path().exists());

    // Memory: a 32 MiB ceiling; the hog wants 256 MiB and is OOM-killed inside its group.
    let mem_limits = Limits {
        memory_max_bytes: 32 << 20,
        ..base_limits()
    };
    let mem = tree.create("cl-mem", &mem_limits).expect("create cl-mem");
    let me = std::env::current_exe().unwrap();
    let mut command = Command::new(&me);
    command
        .args(["--exact", "memory_hog_inside_host_vm", "--ignored"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    mem.place_on_spawn(&mut command).unwrap();
    let status = command.status().expect("run the memory hog");
    let usage = mem.usage().unwrap();
    result("mem-hog-succeeded", status.success());
    result("mem-oom-kills", usage.oom_kills >= 1);
    result(
        "mem-peak-bounded",
        usage.memory_peak_bytes == 0 || usage.memory_peak_bytes <= 32 << 20,
    );
    mem.remove().unwrap();

    // pids: at most 4 tasks; a shell that starts 8 sleepers hits the limit.
    let pid_limits = Limits {
        pids_max: 4,
        ..base_limits()
    };
    let pids = tree.create("cl-pids", &pid_limits).expect("create cl-pids");
    let mut command = Command::new("sh");
    command
        .args([
            "-c",
            "for i in 1 2 3 4 5 6 7 8; do sleep 30 & done; sleep 30",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    pids.place_on_spawn(&mut command).unwrap();
    let mut forker = command.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let usage = pids.usage().unwrap();
    let events = std::fs::read_to_string(pids.path().join("pids.events")).unwrap_or_default();
    result("pids-bounded", usage.pids <= 4);
    result(
        "pids-limit-hit",
        events
            .lines()
            .any(|l| l.starts_with("max ") && l != "max 0"),
    );
    // Removal kills the sleepers still running in the group.
    let members = pids.pids().unwrap();
    pids.remove().unwrap();
    let _ = forker.wait();
    result("pids-removed", !pids.path().exists());
    result(
        "pids-members-dead",
        members.iter().all(|p| {
            !Path::new(&format!("/proc/{p}")).exists()
                || std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .map(|s| s.contains(") Z "))
                    .unwrap_or(true)
        }),
    );

    // Stale sweep: groups of sandboxes the worker no longer knows go, processes and all.
    let keep = tree.create("cl-keep", &base_limits()).unwrap();
    let stale = tree.create("cl-stale", &base_limits()).unwrap();
    let mut command = Command::new("sleep");
    command.arg("60");
    stale.place_on_spawn(&mut command).unwrap();
    let mut sleeper = command.spawn().unwrap();
    let removed = tree
        .remove_stale(&HashSet::from(["cl-keep".to_string()]))
        .unwrap();
    let _ = sleeper.wait();
    result("stale-removed", removed == ["cl-stale"]);
    result("stale-kept", keep.path().exists());
    keep.remove().unwrap();

    // Bad input: a name that would leave the parent.
    result(
        "bad-name",
        tree.create("../escape", &base_limits()).is_err(),
    );
    let left: Vec<String> = std::fs::read_dir(tree.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    result("groups-left", left.len());
}

/// Allocates and touches 256 MiB, then exits 0 (only reached without a ceiling).
#[test]
#[ignore = "started by the host-VM probe inside a memory-limited cgroup"]
fn memory_hog_inside_host_vm() {
    let mut blocks = Vec::new();
    for _ in 0..64 {
        blocks.push(vec![1u8; 4 << 20]);
    }
    assert_eq!(blocks.len(), 64);
}

#[test]
fn cgroups_in_host_vm() {
    let me = std::env::current_exe().unwrap();
    let builder = HostVm::builder()
        .timeout(Duration::from_secs(300))
        .binaries(vec![me]);
    let run = ScriptRun::run_probe(builder, PROBE_TEST).expect("host VM run");
    let all = run.transcript();
    let get = |key: &str| -> String { run.expect_result(key).to_owned() };
    assert_eq!(run.exit_code, 0, "{all}");
    for key in [
        "spawn-placed",
        "cpu-throttled",
        "cpu-held",
        "cpu-removed",
        "mem-oom-kills",
        "mem-peak-bounded",
        "pids-bounded",
        "pids-limit-hit",
        "pids-removed",
        "pids-members-dead",
        "stale-removed",
        "stale-kept",
        "bad-name",
    ] {
        assert_eq!(get(key), "true", "{key}; {all}");
    }
    assert_eq!(get("mem-hog-succeeded"), "false", "{all}");
    assert_eq!(get("groups-left"), "0", "{all}");
}
