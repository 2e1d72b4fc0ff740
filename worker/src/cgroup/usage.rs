//! What a sandbox has consumed, read from its cgroup's stat files, and CPU percentages from two
//! readings (the metrics routes report `cpuUsedPct`, `memUsed` and disk figures).

use std::time::Instant;

/// One reading of a sandbox cgroup's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Total CPU time used, µs (`cpu.stat` usage_usec).
    pub cpu_usage_us: u64,
    /// Periods in which the cgroup hit its quota (`cpu.stat` nr_throttled).
    pub cpu_throttled_periods: u64,
    /// Time spent throttled, µs (`cpu.stat` throttled_usec).
    pub cpu_throttled_us: u64,
    /// Memory charged now, bytes (`memory.current`).
    pub memory_bytes: u64,
    /// Highest memory charged, bytes (`memory.peak`; 0 on kernels without it).
    pub memory_peak_bytes: u64,
    /// Times the OOM killer ran in this cgroup (`memory.events` oom_kill).
    pub oom_kills: u64,
    /// Bytes read from block devices (`io.stat` rbytes, all devices).
    pub io_read_bytes: u64,
    /// Bytes written to block devices (`io.stat` wbytes, all devices).
    pub io_write_bytes: u64,
    /// Tasks in the cgroup (`pids.current`).
    pub pids: u64,
}

/// Reads `key value` lines (`cpu.stat`, `memory.events`): the value of `key`, 0 if absent.
pub fn flat_keyed(text: &str, key: &str) -> u64 {
    text.lines()
        .filter_map(|line| line.split_once(' '))
        .find(|(k, _)| *k == key)
        .and_then(|(_, v)| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Sums `field=value` over every device line of `io.stat` (`8:0 rbytes=1 wbytes=2 ...`).
pub fn io_stat_sum(text: &str, field: &str) -> u64 {
    text.lines()
        .flat_map(|line| line.split_whitespace().skip(1))
        .filter_map(|pair| pair.split_once('='))
        .filter(|(k, _)| *k == field)
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .fold(0u64, u64::saturating_add)
}

/// A single-value file (`memory.current`, `pids.current`): its number, 0 if absent or `max`.
pub fn single_value(text: Option<&str>) -> u64 {
    text.and_then(|t| t.trim().parse().ok()).unwrap_or(0)
}

/// Turns successive CPU readings into a utilisation percentage of the sandbox's vCPUs.
#[derive(Debug)]
pub struct CpuSampler {
    vcpus: u32,
    last: Option<(Instant, u64)>,
}

impl CpuSampler {
    pub fn new(vcpus: u32) -> Self {
        Self {
            vcpus: vcpus.max(1),
            last: None,
        }
    }

    /// Records a reading taken at `at`; returns the utilisation since the previous one in
    /// percent of all vCPUs (0–100), or `None` for the first reading.
    pub fn sample(&mut self, at: Instant, cpu_usage_us: u64) -> Option<f64> {
        let previous = self.last.replace((at, cpu_usage_us));
        let (then, used_then) = previous?;
        let wall_us = at.checked_duration_since(then)?.as_micros();
        if wall_us == 0 {
            return None;
        }
        let used = cpu_usage_us.saturating_sub(used_then);
        let capacity = wall_us as f64 * f64::from(self.vcpus);
        Some((used as f64 / capacity * 100.0).clamp(0.0, 100.0))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const CPU_STAT: &str = "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n\
nr_periods 40\nnr_throttled 12\nthrottled_usec 830000\nnr_bursts 0\nburst_usec 0\n";

    #[test]
    fn reads_cpu_stat_keys() {
        assert_eq!(flat_keyed(CPU_STAT, "usage_usec"), 1_500_000);
        assert_eq!(flat_keyed(CPU_STAT, "nr_throttled"), 12);
        assert_eq!(flat_keyed(CPU_STAT, "throttled_usec"), 830_000);
        assert_eq!(flat_keyed(CPU_STAT, "missing"), 0);
        // A key that is a prefix of another does not match it.
        assert_eq!(flat_keyed("nr_periods_x 5\n", "nr_periods"), 0);
    }

    #[test]
    fn sums_io_stat_over_devices() {
        let text = "8:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n\
253:1 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n";
        assert_eq!(io_stat_sum(text, "rbytes"), 4196);
        assert_eq!(io_stat_sum(text, "wbytes"), 8192);
        assert_eq!(io_stat_sum("", "rbytes"), 0);
    }

    #[test]
    fn single_values_tolerate_max_and_absence() {
        assert_eq!(single_value(Some("123\n")), 123);
        assert_eq!(single_value(Some("max\n")), 0);
        assert_eq!(single_value(None), 0);
    }

    #[test]
    fn cpu_percent_is_relative_to_all_vcpus() {
        let mut sampler = CpuSampler::new(2);
        let t0 = Instant::now();
        assert_eq!(sampler.sample(t0, 0), None);
        // One full CPU for one second out of two vCPUs: 50%.
        let pct = sampler
            .sample(t0 + Duration::from_secs(1), 1_000_000)
            .unwrap();
        assert!((pct - 50.0).abs() < 1e-9, "{pct}");
        // Nothing used: 0%.
        let idle = sampler
            .sample(t0 + Duration::from_secs(2), 1_000_000)
            .unwrap();
        assert_eq!(idle, 0.0);
    }
}
