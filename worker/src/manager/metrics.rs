//! One resource sample of a running sandbox: from its cgroup when the worker places VMMs in
//! cgroups, else from the VMM process's `/proc/<pid>/stat` and `statm` (the VMM's RSS is the
//! guest memory it touched plus the VMM's own). CPU percentages need two readings, so each
//! sandbox keeps a [`CpuSampler`]; the first sample reports 0 %.

use std::path::Path;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use roost_proto::control::MetricSample;

use crate::cgroup::{CpuSampler, SandboxCgroup};

/// `/proc` counts CPU time in USER_HZ ticks, 100 per second on Linux/x86.
const USER_HZ: u64 = 100;
const PAGE_SIZE: u64 = 4096;

/// CPU time used (µs) and memory charged (bytes) by one VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    pub cpu_usage_us: u64,
    pub memory_bytes: u64,
}

/// Reads `/proc/<pid>/stat` (utime + stime) and `/proc/<pid>/statm` (resident pages).
pub fn read_proc(proc_root: &Path, pid: u32) -> Option<Reading> {
    let dir = proc_root.join(pid.to_string());
    let stat = std::fs::read_to_string(dir.join("stat")).ok()?;
    let statm = std::fs::read_to_string(dir.join("statm")).ok()?;
    let ticks = parse_stat_cpu_ticks(&stat)?;
    let resident: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(Reading {
        cpu_usage_us: ticks.saturating_mul(1_000_000 / USER_HZ),
        memory_bytes: resident.saturating_mul(PAGE_SIZE),
    })
}

/// utime + stime from a `/proc/<pid>/stat` line. The command name (field 2) may hold spaces
/// and parentheses, so fields are counted after its last `)`.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the name: state is field 3, utime field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime.saturating_add(stime))
}

/// Reads the cgroup's counters.
pub fn read_cgroup(cgroup: &SandboxCgroup) -> Option<Reading> {
    let usage = cgroup.usage().ok()?;
    Some(Reading {
        cpu_usage_us: usage.cpu_usage_us,
        memory_bytes: usage.memory_bytes,
    })
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// A sample from `reading`, with the CPU percentage since `sampler`'s previous reading.
pub fn sample(
    reading: Reading,
    sampler: &mut CpuSampler,
    vcpus: u32,
    memory_mib: u64,
    disk_mib: u64,
) -> MetricSample {
    let cpu = sampler
        .sample(Instant::now(), reading.cpu_usage_us)
        .unwrap_or(0.0);
    let mem_total = memory_mib.saturating_mul(1 << 20);
    MetricSample {
        timestamp_ms: now_ms(),
        cpu_count: vcpus,
        cpu_used_pct: cpu,
        mem_used: reading.memory_bytes.min(mem_total),
        mem_total,
        mem_cache: 0,
        disk_used: 0,
        disk_total: disk_mib.saturating_mul(1 << 20),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_ticks_survive_odd_process_names() {
        let stat = "4242 (roost (vm) run) S 1 4242 4242 0 -1 4194560 500 0 0 0 \
                    150 50 0 0 20 0 3 0 100 1000000 300 18446744073709551615";
        assert_eq!(parse_stat_cpu_ticks(stat), Some(200));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
        assert_eq!(parse_stat_cpu_ticks("1 (x) S 1 2"), None);
    }

    #[test]
    fn this_process_can_be_read_from_proc() {
        let reading = read_proc(Path::new("/proc"), std::process::id()).unwrap();
        assert!(reading.memory_bytes > 0, "{reading:?}");
        assert_eq!(read_proc(Path::new("/proc"), u32::MAX), None);
    }

    #[test]
    fn samples_are_capped_to_the_sandbox_size() {
        let mut sampler = CpuSampler::new(2);
        let s = sample(
            Reading {
                cpu_usage_us: 10,
                memory_bytes: 1 << 40,
            },
            &mut sampler,
            2,
            256,
            1024,
        );
        assert_eq!(s.cpu_count, 2);
        assert_eq!(s.cpu_used_pct, 0.0, "first reading has no rate");
        assert_eq!(s.mem_total, 256 << 20);
        assert_eq!(s.mem_used, 256 << 20);
        assert_eq!(s.disk_total, 1024 << 20);
        assert!(s.timestamp_ms > 1_700_000_000_000);
    }
}
