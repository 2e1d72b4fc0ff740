//! The host VM's own costs: how long the QEMU TCG host VM takes to boot, and how long from
//! starting it until a nested guest (QEMU microvm on the host VM's real KVM) prints
//! roost-agent's ready line.
//!
//! Each run boots a fresh host VM that runs `roost-bench guest-boot --runs 1` inside, so the
//! figure is what a developer waits for between `roost hostvm run` and a ready sandbox. The
//! timestamps come from roost-hostvm's line callback (time since QEMU started, taken when the
//! line arrives on this side), so no clock inside the host VM is trusted.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use roost_hostvm::{HostVm, HostVmError, Output, StreamKind};

use crate::guest_boot::READY_PREFIX;

/// Errors of one host-VM run.
#[derive(Debug, thiserror::Error)]
pub enum HostVmBenchError {
    #[error("the host VM run failed")]
    HostVm(#[from] HostVmError),
    #[error("the guest-boot command inside the host VM exited with status {0}")]
    CommandFailed(i32),
    #[error("the nested guest's ready line never reached this side")]
    NoReadyLine,
}

/// One host-VM run's timings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostVmSample {
    /// QEMU start → the host VM's `/init` running.
    pub host_boot: Duration,
    /// QEMU start → the nested guest's ready line arriving here.
    pub start_to_guest_ready: Duration,
    /// The nested guest's own boot as timed inside the host VM (QEMU microvm start → ready).
    pub guest_boot_inside: Option<Duration>,
}

/// What to boot inside.
#[derive(Debug, Clone)]
pub struct HostVmBench {
    pub cpus: u32,
    pub mem_mib: u32,
    /// Root filesystem image name without the `rootfs-` prefix.
    pub image: String,
    pub timeout: Duration,
}

impl HostVmBench {
    /// Boots one host VM, runs one nested guest boot in it, and returns the timings.
    pub fn run_once(&self) -> Result<HostVmSample, HostVmBenchError> {
        let seen = Arc::new(Mutex::new(LinesSeen::default()));
        let sink = Arc::clone(&seen);
        let outcome = HostVm::builder()
            .cpus(self.cpus)
            .mem_mib(self.mem_mib)
            .timeout(self.timeout)
            .images(vec![format!("rootfs-{}", self.image)])
            .output(Output::Lines(Box::new(move |line| {
                let mut seen = sink.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                seen.observe(line.stream, line.line, line.since_start);
            })))
            .run([
                "roost-bench",
                "guest-boot",
                "--vmm",
                "qemu",
                "--runs",
                "1",
                "--image",
                &self.image,
            ])?;
        if outcome.exit_code != 0 {
            return Err(HostVmBenchError::CommandFailed(outcome.exit_code));
        }
        let seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        Ok(HostVmSample {
            host_boot: outcome.boot.qemu_to_init,
            start_to_guest_ready: seen.ready_at.ok_or(HostVmBenchError::NoReadyLine)?,
            guest_boot_inside: seen.guest_boot_inside,
        })
    }
}

/// What the line callback picked out of guest-boot's output.
#[derive(Debug, Default)]
struct LinesSeen {
    ready_at: Option<Duration>,
    guest_boot_inside: Option<Duration>,
}

impl LinesSeen {
    fn observe(&mut self, stream: StreamKind, line: &str, since_start: Duration) {
        match stream {
            StreamKind::Stderr if self.ready_at.is_none() && line.contains(READY_PREFIX) => {
                self.ready_at = Some(since_start);
            }
            StreamKind::Stdout => {
                if let Some(ms) = guest_boot_p50_ms(line) {
                    self.guest_boot_inside = Some(Duration::from_secs_f64(ms / 1000.0));
                }
            }
            StreamKind::Stderr => {}
        }
    }
}

/// `qemu_boot_ms_p50` from guest-boot's JSON report line, if this is that line.
fn guest_boot_p50_ms(line: &str) -> Option<f64> {
    let report: serde_json::Value = serde_json::from_str(line).ok()?;
    report.get("qemu_boot_ms_p50")?.as_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_time_is_the_first_ready_line_on_stderr() {
        let mut seen = LinesSeen::default();
        seen.observe(StreamKind::Stderr, "booting", Duration::from_secs(1));
        seen.observe(
            StreamKind::Stdout,
            "roost-agent: ready on stdout does not count",
            Duration::from_secs(2),
        );
        seen.observe(
            StreamKind::Stderr,
            "boot 1/1: 900 ms  (roost-agent: ready hostname=bench-0)",
            Duration::from_secs(3),
        );
        seen.observe(
            StreamKind::Stderr,
            "roost-agent: ready again",
            Duration::from_secs(4),
        );
        assert_eq!(seen.ready_at, Some(Duration::from_secs(3)));
    }

    #[test]
    fn inner_boot_time_comes_from_the_json_report() {
        let mut seen = LinesSeen::default();
        seen.observe(
            StreamKind::Stdout,
            r#"{"scenario":"guest-boot","qemu_boot_ms_p50":1250.0}"#,
            Duration::from_secs(9),
        );
        assert_eq!(seen.guest_boot_inside, Some(Duration::from_millis(1250)));
        assert_eq!(guest_boot_p50_ms("not json"), None);
        assert_eq!(guest_boot_p50_ms(r#"{"other":1}"#), None);
    }
}
