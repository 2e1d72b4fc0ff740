//! Boots the guest kernel with a root filesystem image under QEMU's `microvm` machine and
//! times it to roost-agent's ready line.
//!
//! This is the baseline every Roost VMM figure is compared with: the same kernel and image,
//! booted by a mature VMM on the same (host-VM) KVM in the same run.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use roost_images::{ArtefactIndex, Cache};

/// The prefix of the line roost-agent prints on the console once the guest is up.
pub const READY_PREFIX: &str = "roost-agent: ready";

/// Console lines kept for error messages.
const TAIL_LINES: usize = 40;

/// Errors booting a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot find the guest artefacts")]
    Artefacts(#[from] roost_images::IndexError),
    #[error("cannot open the artefact cache")]
    Cache(#[from] roost_images::CacheError),
    #[error("cannot start {program}: is QEMU installed? (`apt-get install qemu-system-x86`)")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the guest did not print `{READY_PREFIX}` within {timeout:?}; console tail:\n{tail}")]
    Timeout { timeout: Duration, tail: String },
    #[error("QEMU exited ({status}) before the guest was ready; console tail:\n{tail}")]
    Exited {
        status: std::process::ExitStatus,
        tail: String,
    },
}

/// The kernel and root filesystem to boot.
#[derive(Debug, Clone)]
pub struct GuestImages {
    pub kernel: PathBuf,
    pub rootfs: PathBuf,
}

impl GuestImages {
    /// The current kernel and the named rootfs image (index name, e.g. `rootfs-base`) from the
    /// artefact index (inside the host VM, its index points at the attached drives).
    pub fn from_index(rootfs_index_name: &str) -> Result<Self, BootError> {
        let index = ArtefactIndex::new(&Cache::from_env()?);
        Ok(Self {
            kernel: index.lookup("kernel")?.path,
            rootfs: index.lookup(rootfs_index_name)?.path,
        })
    }
}

/// Which QEMU accelerator to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Accel {
    /// Hardware virtualisation (needs a usable /dev/kvm: inside the host VM here).
    Kvm,
    /// Software emulation: slow, but works anywhere (for trying images without KVM).
    Tcg,
}

/// A QEMU `microvm` launch.
#[derive(Debug, Clone)]
pub struct QemuMicrovm {
    pub qemu: PathBuf,
    pub accel: Accel,
    pub cpus: u8,
    pub mem_mib: u32,
    pub timeout: Duration,
}

impl Default for QemuMicrovm {
    fn default() -> Self {
        Self {
            qemu: PathBuf::from("qemu-system-x86_64"),
            accel: Accel::Kvm,
            cpus: 1,
            mem_mib: 256,
            timeout: Duration::from_secs(120),
        }
    }
}

/// The guest kernel command line for a microVM booted from a read-only root image.
pub fn kernel_cmdline(hostname: &str) -> String {
    format!(
        "console=ttyS0 reboot=t panic=-1 quiet root=/dev/vda ro rootfstype=ext4 roost.hostname={hostname}"
    )
}

/// One timed boot.
#[derive(Debug, Clone)]
pub struct BootSample {
    /// From spawning QEMU to the ready line arriving on its console.
    pub ready_after: Duration,
    /// The ready line itself.
    pub ready_line: String,
}

impl QemuMicrovm {
    /// The QEMU command that boots `images` with the given guest hostname.
    pub fn command(&self, images: &GuestImages, hostname: &str) -> Command {
        let accel = match self.accel {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        };
        let cpu = match self.accel {
            Accel::Kvm => "host",
            Accel::Tcg => "max",
        };
        let mut cmd = Command::new(&self.qemu);
        cmd.args([
            "-M",
            "microvm,x-option-roms=off,rtc=off,acpi=off,isa-serial=on",
        ])
        .args(["-accel", accel, "-cpu", cpu])
        .args([
            "-smp",
            &self.cpus.to_string(),
            "-m",
            &self.mem_mib.to_string(),
        ])
        .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&images.kernel)
        .args(["-append", &kernel_cmdline(hostname)])
        .arg("-drive")
        .arg(drive_arg(&images.rootfs))
        .args(["-device", "virtio-blk-device,drive=root"]);
        cmd
    }

    /// Boots once and returns when the ready line appears (the VM is then killed). Every
    /// console line is copied to `console` if given.
    pub fn boot_to_ready(
        &self,
        images: &GuestImages,
        hostname: &str,
        mut console: Option<&mut dyn Write>,
    ) -> Result<BootSample, BootError> {
        let started = Instant::now();
        let mut command = self.command(images, hostname);
        command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().map_err(|source| BootError::Spawn {
            program: self.qemu.display().to_string(),
            source,
        })?;
        let mut child = KillOnDrop(child);
        let (tx, rx) = mpsc::channel();
        for stream in [
            child
                .0
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .0
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
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
        drop(tx);
        let deadline = started + self.timeout;
        let mut tail = std::collections::VecDeque::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(out) = console.as_mut() {
                        let _ = writeln!(out, "{line}");
                    }
                    if let Some(pos) = line.find(READY_PREFIX) {
                        return Ok(BootSample {
                            ready_after: started.elapsed(),
                            ready_line: line[pos..].to_owned(),
                        });
                    }
                    if tail.len() == TAIL_LINES {
                        tail.pop_front();
                    }
                    tail.push_back(line);
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(BootError::Timeout {
                        timeout: self.timeout,
                        tail: join(&tail),
                    });
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.0.wait().map_err(|source| BootError::Spawn {
                        program: self.qemu.display().to_string(),
                        source,
                    })?;
                    return Err(BootError::Exited {
                        status,
                        tail: join(&tail),
                    });
                }
            }
        }
    }
}

fn drive_arg(rootfs: &Path) -> String {
    // QEMU's option parser treats ',' as a separator: double it inside the path.
    let path = rootfs.display().to_string().replace(',', ",,");
    format!("id=root,file={path},format=raw,if=none,readonly=on")
}

fn join(lines: &std::collections::VecDeque<String>) -> String {
    lines
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Kills and reaps the VM whatever path the caller leaves by.
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

    fn images() -> GuestImages {
        GuestImages {
            kernel: "/k/vmlinux".into(),
            rootfs: "/img/a,b.ext4".into(),
        }
    }

    #[test]
    fn command_boots_read_only_root_on_virtio_mmio() {
        let cmd = QemuMicrovm::default().command(&images(), "h1");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        assert!(joined.contains("-accel kvm -cpu host"), "{joined}");
        assert!(
            joined.contains("file=/img/a,,b.ext4,format=raw,if=none,readonly=on"),
            "{joined}"
        );
        assert!(joined.contains("virtio-blk-device,drive=root"), "{joined}");
        assert!(joined.contains("roost.hostname=h1"), "{joined}");
        assert!(joined.contains("-no-reboot"), "{joined}");
    }

    #[test]
    fn a_vmm_that_exits_early_reports_its_console() {
        let vmm = QemuMicrovm {
            qemu: "/bin/echo".into(),
            ..QemuMicrovm::default()
        };
        match vmm.boot_to_ready(&images(), "h", None) {
            Err(BootError::Exited { tail, .. }) => assert!(tail.contains("-kernel"), "{tail}"),
            other => panic!("expected Exited, got {other:?}"),
        }
    }

    /// Writes a shell script that stands in for QEMU; removed when the guard drops.
    fn fake_vmm(name: &str, body: &str) -> tempfile_path::TempScript {
        tempfile_path::TempScript::new(name, body)
    }

    mod tempfile_path {
        use std::os::unix::fs::PermissionsExt;
        use std::path::PathBuf;

        pub struct TempScript(pub PathBuf);

        impl TempScript {
            pub fn new(name: &str, body: &str) -> Self {
                let path =
                    std::env::temp_dir().join(format!("roost-bench-{name}-{}", std::process::id()));
                std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
                Self(path)
            }
        }

        impl Drop for TempScript {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
    }

    #[test]
    fn the_ready_line_is_found_mid_line() {
        let script = fake_vmm(
            "ready",
            &format!("echo noise; echo '[  1.0] {READY_PREFIX} hostname=h'; exec sleep 30"),
        );
        let vmm = QemuMicrovm {
            qemu: script.0.clone(),
            ..QemuMicrovm::default()
        };
        let sample = vmm.boot_to_ready(&images(), "h", None).unwrap();
        assert!(
            sample.ready_line.starts_with(READY_PREFIX),
            "{}",
            sample.ready_line
        );
        assert!(sample.ready_after < Duration::from_secs(20));
    }

    #[test]
    fn a_silent_vmm_times_out_with_its_console_tail() {
        let script = fake_vmm("silent", "echo booting; exec sleep 30");
        let vmm = QemuMicrovm {
            qemu: script.0.clone(),
            timeout: Duration::from_millis(500),
            ..QemuMicrovm::default()
        };
        match vmm.boot_to_ready(&images(), "h", None) {
            Err(BootError::Timeout { tail, .. }) => assert_eq!(tail, "booting"),
            other => panic!("expected Timeout, got {other:?}"),
        }
    }
}
