//! Boots the guest under Roost's own VMM (`roost vm run`) to roost-agent's ready line, and
//! measures the VMM process's own memory: its RSS minus the guest RAM mapping's RSS.
//!
//! Used by `roost-bench boot`, which interleaves these boots with QEMU microvm boots of the same
//! kernel, image and command line (see [`crate::guest_boot`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use crate::guest_boot::{GuestImages, READY_PREFIX, kernel_cmdline};

/// Console lines kept for error messages.
const TAIL_LINES: usize = 40;
/// How long the guest idles after its ready line before the VMM's memory is read.
const IDLE_BEFORE_RSS: Duration = Duration::from_millis(500);

/// Errors booting a guest under roost-vmm.
#[derive(Debug, thiserror::Error)]
pub enum VmmBootError {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest did not print `{READY_PREFIX}` within {timeout:?}; console tail:\n{tail}")]
    Timeout { timeout: Duration, tail: String },
    #[error("roost vm run exited ({status}) before the guest was ready; output tail:\n{tail}")]
    Exited {
        status: std::process::ExitStatus,
        tail: String,
    },
    #[error("cannot read the VMM's memory map")]
    Smaps(#[source] std::io::Error),
}

/// A `roost vm run` launch.
#[derive(Debug, Clone)]
pub struct RoostVmm {
    /// The `roost` binary.
    pub roost: PathBuf,
    pub cpus: u8,
    pub mem_mib: u32,
    pub timeout: Duration,
}

impl Default for RoostVmm {
    fn default() -> Self {
        Self {
            roost: sibling_binary("roost"),
            cpus: 1,
            mem_mib: 256,
            timeout: Duration::from_secs(120),
        }
    }
}

/// `name` next to this executable if it is there (target/<profile>/, /opt/roost/bin), else
/// `name` on PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// One timed boot.
#[derive(Debug, Clone)]
pub struct VmmBootSample {
    /// From spawning the VMM to the ready line on its console.
    pub ready_after: Duration,
    pub ready_line: String,
    /// The VMM process's RSS outside guest RAM, idle after boot, KiB.
    pub vmm_rss_kib: u64,
}

impl RoostVmm {
    /// The command booting `images` read-only with QEMU's command line for `hostname`.
    pub fn command(&self, images: &GuestImages, hostname: &str) -> Command {
        let mut cmd = Command::new(&self.roost);
        cmd.args(["vm", "run", "--rootfs-ro", "--console"])
            .arg("--kernel")
            .arg(&images.kernel)
            .arg("--rootfs")
            .arg(&images.rootfs)
            .args(["--cpus", &self.cpus.to_string()])
            .args(["--mem", &self.mem_mib.to_string()])
            .args(["--cmdline", &kernel_cmdline(hostname)]);
        cmd
    }

    /// Boots once, waits for the ready line, reads the VMM's memory, and kills the VM.
    pub fn boot_to_ready(
        &self,
        images: &GuestImages,
        hostname: &str,
    ) -> Result<VmmBootSample, VmmBootError> {
        let started = Instant::now();
        let child = self
            .command(images, hostname)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| VmmBootError::Spawn {
                program: self.roost.display().to_string(),
                source,
            })?;
        let mut child = KillOnDrop(child);
        let rx = line_channel(&mut child.0);
        let deadline = started + self.timeout;
        let mut tail = std::collections::VecDeque::new();
        loop {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(line) => {
                    if let Some(pos) = line.find(READY_PREFIX) {
                        let ready_after = started.elapsed();
                        std::thread::sleep(IDLE_BEFORE_RSS);
                        let vmm_rss_kib = vmm_rss_kib(child.0.id(), u64::from(self.mem_mib) << 10)
                            .map_err(VmmBootError::Smaps)?;
                        return Ok(VmmBootSample {
                            ready_after,
                            ready_line: line[pos..].to_owned(),
                            vmm_rss_kib,
                        });
                    }
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(VmmBootError::Timeout {
                        timeout: self.timeout,
                        tail: Vec::from(tail).join("\n"),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.0.wait().map_err(|source| VmmBootError::Spawn {
                        program: self.roost.display().to_string(),
                        source,
                    })?;
                    return Err(VmmBootError::Exited {
                        status,
                        tail: Vec::from(tail).join("\n"),
                    });
                }
            }
        }
    }
}

/// Merges the child's stdout and stderr into one channel of lines.
fn line_channel(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let streams: [Option<Box<dyn std::io::Read + Send>>; 2] = [
        child.stdout.take().map(|s| Box::new(s) as _),
        child.stderr.take().map(|s| Box::new(s) as _),
    ];
    for stream in streams.into_iter().flatten() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end().to_owned();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    rx
}

/// RSS of process `pid` outside its guest-RAM mapping (the anonymous mapping whose size is
/// exactly `guest_kib`), KiB.
pub fn vmm_rss_kib(pid: u32, guest_kib: u64) -> std::io::Result<u64> {
    let smaps = std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("smaps"))?;
    Ok(rss_outside_guest(&smaps, guest_kib))
}

/// See [`vmm_rss_kib`]; parses `/proc/PID/smaps` text.
pub fn rss_outside_guest(smaps: &str, guest_kib: u64) -> u64 {
    let field = |line: &str, name: &str| -> Option<u64> {
        line.strip_prefix(name)?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    };
    let (mut total, mut size) = (0u64, 0u64);
    let mut guest_seen = false;
    for line in smaps.lines() {
        if let Some(kib) = field(line, "Size:") {
            size = kib;
        } else if let Some(kib) = field(line, "Rss:") {
            if size == guest_kib && !guest_seen {
                guest_seen = true;
            } else {
                total += kib;
            }
        }
    }
    total
}

/// Kills and reaps the VMM whatever path the caller leaves by.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_is_left_out_of_the_vmm_rss() {
        let smaps = "\
55d0-55d1 r-xp 00000000 fe:00 1 /opt/roost/bin/roost
Size:               1500 kB
Rss:                1200 kB
7f00-7f10 rw-p 00000000 00:00 0
Size:             262144 kB
Rss:               40000 kB
7f20-7f21 rw-p 00000000 00:00 0
Size:                132 kB
Rss:                  16 kB
";
        assert_eq!(rss_outside_guest(smaps, 262_144), 1216);
        assert_eq!(rss_outside_guest(smaps, 1), 41_216);
    }

    #[test]
    fn the_command_uses_qemus_command_line_and_a_read_only_root() {
        let vmm = RoostVmm {
            roost: "/opt/roost/bin/roost".into(),
            ..RoostVmm::default()
        };
        let images = GuestImages {
            kernel: "/k/vmlinux".into(),
            rootfs: "/r/root.ext4".into(),
        };
        let cmd = vmm.command(&images, "h1");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(&args[..4], ["vm", "run", "--rootfs-ro", "--console"]);
        let cmdline = args.iter().position(|a| a == "--cmdline").unwrap();
        assert_eq!(args[cmdline + 1], kernel_cmdline("h1"));
        assert!(args.windows(2).any(|w| w == ["--mem", "256"]));
    }
}
