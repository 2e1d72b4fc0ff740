//! What a sandbox may consume, and how each limit is written into cgroup v2 interface files.
//!
//! The limits derive from the sandbox's shape: its vCPUs cap CPU time (a VM with 2 vCPUs may
//! use two host CPUs' worth, or a configured fraction of that), and its memory ceiling is the
//! guest's RAM plus a bounded allowance for the VMM process itself (page tables, device
//! buffers, the binary), so a guest can never make its VMM grow past what the host planned for.

/// The CFS period used for `cpu.max` (the kernel default, 100 ms).
pub const CPU_PERIOD_US: u64 = 100_000;
/// What the VMM process may use beyond guest RAM by default (its RSS is ~7 MiB idle; device
/// queues and vsock buffers are bounded; page tables for 32 GiB of guest RAM are ~64 MiB).
pub const DEFAULT_VMM_OVERHEAD_BYTES: u64 = 96 << 20;
/// Processes and threads a VMM needs: main, device thread, one per vCPU, API and helpers.
pub const DEFAULT_PIDS_MAX: u64 = 64;
/// cgroup v2's default I/O weight (range 1..=10000).
pub const DEFAULT_IO_WEIGHT: u16 = 100;

/// Why a set of limits was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("a CPU quota of {percent}% is outside 1..={max}% (100% per vCPU)")]
    CpuQuota { percent: u32, max: u32 },
    #[error("a memory ceiling of {0} bytes is below the 16 MiB minimum")]
    MemoryTooSmall(u64),
    #[error("a pids limit of 0 would stop the VMM from starting its threads")]
    NoPids,
    #[error("an I/O weight of {0} is outside 1..=10000")]
    IoWeight(u16),
}

/// Resource limits of one sandbox's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// CPU time as a percentage of one host CPU (200 = two CPUs' worth); `None` = unlimited.
    pub cpu_percent: Option<u32>,
    /// `memory.max`: guest RAM plus the VMM's allowance, in bytes.
    pub memory_max_bytes: u64,
    /// `pids.max`.
    pub pids_max: u64,
    /// `io.weight` (proportional disk bandwidth under contention).
    pub io_weight: u16,
}

impl Limits {
    /// Limits for a VM of `vcpus` vCPUs and `mem_mib` MiB of guest RAM: all of its vCPUs'
    /// worth of CPU time, guest RAM + [`DEFAULT_VMM_OVERHEAD_BYTES`], default pids and weight.
    pub fn for_vm(vcpus: u8, mem_mib: u64) -> Self {
        Self {
            cpu_percent: Some(u32::from(vcpus) * 100),
            memory_max_bytes: (mem_mib << 20).saturating_add(DEFAULT_VMM_OVERHEAD_BYTES),
            pids_max: DEFAULT_PIDS_MAX,
            io_weight: DEFAULT_IO_WEIGHT,
        }
    }

    /// Checks the limits; `host_cpus` bounds the CPU quota.
    pub fn validate(&self, host_cpus: u32) -> Result<(), LimitsError> {
        if let Some(percent) = self.cpu_percent {
            let max = host_cpus.max(1) * 100;
            if percent == 0 || percent > max {
                return Err(LimitsError::CpuQuota { percent, max });
            }
        }
        if self.memory_max_bytes < 16 << 20 {
            return Err(LimitsError::MemoryTooSmall(self.memory_max_bytes));
        }
        if self.pids_max == 0 {
            return Err(LimitsError::NoPids);
        }
        if !(1..=10_000).contains(&self.io_weight) {
            return Err(LimitsError::IoWeight(self.io_weight));
        }
        Ok(())
    }

    /// The interface files and values that apply these limits, in the order they are written.
    /// `io.weight` is left out when the hierarchy has no io controller (`with_io` false).
    pub fn files(&self, with_io: bool) -> Vec<(&'static str, String)> {
        let cpu = match self.cpu_percent {
            Some(percent) => format!("{} {CPU_PERIOD_US}", cpu_quota_us(percent)),
            None => format!("max {CPU_PERIOD_US}"),
        };
        let mut files = vec![
            ("cpu.max", cpu),
            ("memory.max", self.memory_max_bytes.to_string()),
            // Reclaim pressure starts a little below the ceiling, so the VMM is slowed before
            // it is killed.
            ("memory.high", (self.memory_max_bytes / 16 * 15).to_string()),
            ("pids.max", self.pids_max.to_string()),
        ];
        if with_io {
            files.push(("io.weight", format!("default {}", self.io_weight)));
        }
        files
    }
}

/// The `cpu.max` quota for `percent` of one CPU over [`CPU_PERIOD_US`].
pub fn cpu_quota_us(percent: u32) -> u64 {
    CPU_PERIOD_US * u64::from(percent) / 100
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_gets_its_vcpus_worth_of_cpu_and_guest_ram_plus_overhead() {
        let limits = Limits::for_vm(2, 512);
        assert_eq!(limits.cpu_percent, Some(200));
        assert_eq!(limits.memory_max_bytes, (512 << 20) + (96 << 20));
        limits.validate(2).unwrap();
        let files = limits.files(true);
        assert_eq!(files[0], ("cpu.max", "200000 100000".to_string()));
        assert_eq!(files[1], ("memory.max", "637534208".to_string()));
        assert_eq!(files[2].0, "memory.high");
        assert_eq!(files[3], ("pids.max", "64".to_string()));
        assert_eq!(files[4], ("io.weight", "default 100".to_string()));
    }

    #[test]
    fn io_weight_is_skipped_without_the_io_controller() {
        let files = Limits::for_vm(1, 256).files(false);
        assert!(files.iter().all(|(f, _)| *f != "io.weight"));
    }

    #[test]
    fn unlimited_cpu_is_written_as_max() {
        let limits = Limits {
            cpu_percent: None,
            ..Limits::for_vm(1, 256)
        };
        assert_eq!(limits.files(false)[0].1, "max 100000");
    }

    #[test]
    fn impossible_limits_are_refused() {
        let base = Limits::for_vm(1, 256);
        let bad_cpu = Limits {
            cpu_percent: Some(300),
            ..base
        };
        assert_eq!(
            bad_cpu.validate(2),
            Err(LimitsError::CpuQuota {
                percent: 300,
                max: 200
            })
        );
        let zero_cpu = Limits {
            cpu_percent: Some(0),
            ..base
        };
        assert!(zero_cpu.validate(2).is_err());
        let tiny = Limits {
            memory_max_bytes: 1 << 20,
            ..base
        };
        assert_eq!(tiny.validate(2), Err(LimitsError::MemoryTooSmall(1 << 20)));
        let no_pids = Limits {
            pids_max: 0,
            ..base
        };
        assert_eq!(no_pids.validate(2), Err(LimitsError::NoPids));
        let weight = Limits {
            io_weight: 0,
            ..base
        };
        assert_eq!(weight.validate(2), Err(LimitsError::IoWeight(0)));
    }

    #[test]
    fn fractional_quotas_round_down_to_microseconds() {
        assert_eq!(cpu_quota_us(25), 25_000);
        assert_eq!(cpu_quota_us(150), 150_000);
    }
}
