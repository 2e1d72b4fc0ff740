//! The QEMU command line of the host VM, and the QEMU process (killed when dropped).

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use crate::forward::Forward;
use crate::overlay::AttachedImage;
use crate::protocol::{CONTROL_PORT, STDERR_PORT, STDOUT_PORT};

/// The host's QEMU binary.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// Kernel command line of the host VM. `mitigations=off`: this is a test rig, and TCG pays for
/// every mitigation in emulated instructions. `cryptomgr.notests`: a vCPU once hung for good in
/// the crypto self-tests under TCG (soft lockups in `cryptomgr_test`), and they cost boot time.
/// `loglevel=5` (quiet, but with warnings): a soft lockup's stack trace is a warning, and it is
/// the one clue to why a host VM wedged (see [`crate::HostVmError::Unresponsive`]).
pub const HOST_VM_APPEND: &str =
    "console=ttyS0 panic=-1 rdinit=/init loglevel=5 mitigations=off cryptomgr.notests";

/// The paths of one run's QEMU endpoints.
#[derive(Debug, Clone)]
pub struct Endpoints {
    pub control: PathBuf,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
    pub console_log: PathBuf,
}

impl Endpoints {
    pub fn in_dir(dir: &Path) -> Self {
        Self {
            control: dir.join("control.sock"),
            stdout: dir.join("stdout.sock"),
            stderr: dir.join("stderr.sock"),
            console_log: dir.join("console.log"),
        }
    }
}

/// What the QEMU command line is made of.
#[derive(Debug, Clone)]
pub struct QemuConfig<'a> {
    pub cpus: u32,
    pub mem_mib: u32,
    pub kernel: &'a Path,
    pub initrd: &'a Path,
    pub forwards: &'a [Forward],
    pub images: &'a [(AttachedImage, PathBuf)],
    pub endpoints: &'a Endpoints,
}

/// The arguments after `qemu-system-x86_64`.
pub fn host_vm_args(cfg: &QemuConfig<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    let mut push = |parts: &[&str]| args.extend(parts.iter().map(OsString::from));
    push(&[
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
    ]);
    push(&["-accel", "tcg,thread=multi", "-cpu", "EPYC,+svm"]);
    push(&[
        "-smp",
        &cfg.cpus.to_string(),
        "-m",
        &cfg.mem_mib.to_string(),
    ]);
    push(&[
        "-kernel",
        &path(cfg.kernel),
        "-initrd",
        &path(cfg.initrd),
        "-append",
        HOST_VM_APPEND,
    ]);
    let console = format!(
        "file,id=console,path={}",
        escape(&path(&cfg.endpoints.console_log))
    );
    push(&["-chardev", &console, "-serial", "chardev:console"]);
    push(&["-device", "virtio-serial-pci,id=vser"]);
    for (id, name, socket) in [
        ("control", CONTROL_PORT, &cfg.endpoints.control),
        ("stdout", STDOUT_PORT, &cfg.endpoints.stdout),
        ("stderr", STDERR_PORT, &cfg.endpoints.stderr),
    ] {
        let chardev = format!(
            "socket,id={id},path={},server=on,wait=off",
            escape(&path(socket))
        );
        let port = format!("virtserialport,bus=vser.0,chardev={id},name={name}");
        push(&["-chardev", &chardev, "-device", &port]);
    }
    let mut netdev = String::from("user,id=net0");
    for forward in cfg.forwards {
        netdev.push_str(",hostfwd=");
        netdev.push_str(&forward.hostfwd());
    }
    push(&[
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=net0,romfile=",
    ]);
    push(&["-device", "virtio-rng-pci"]);
    for (i, (image, file)) in cfg.images.iter().enumerate() {
        let drive = format!(
            "file={},format=raw,if=none,id=img{i},readonly=on",
            escape(&path(file))
        );
        let device = format!("virtio-blk-pci,drive=img{i},serial={}", image.serial);
        push(&["-drive", &drive, "-device", &device]);
    }
    args
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// QEMU option values escape a comma by doubling it.
fn escape(value: &str) -> String {
    value.replace(',', ",,")
}

/// A running QEMU, killed and reaped when dropped.
#[derive(Debug)]
pub struct QemuProcess {
    child: Child,
    pub log: PathBuf,
}

impl QemuProcess {
    /// Starts QEMU with `args`, its own output going to `log`. QEMU gets its own process group
    /// (so a terminal's Ctrl-C reaches only us, and we stop QEMU) and dies if we die.
    pub fn spawn(args: &[OsString], log: &Path) -> io::Result<Self> {
        let out = File::create(log)?;
        let mut command = Command::new(QEMU_BINARY);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only calls prctl(2),
        // which is async-signal-safe; it touches no memory shared with the parent.
        unsafe {
            command.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Some(nix::sys::signal::Signal::SIGKILL))
                    .map_err(io::Error::from)
            });
        }
        Ok(Self {
            child: command.spawn()?,
            log: log.to_owned(),
        })
    }

    /// The exit status if QEMU has exited.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Kills QEMU (if still running) and reaps it.
    pub fn kill(&mut self) -> io::Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        match self.child.kill() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::InvalidInput => {}
            Err(e) => return Err(e),
        }
        self.child.wait()
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            tracing::warn!(error = %e, "could not stop QEMU");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use roost_images::Artefact;

    fn joined(args: &[OsString]) -> String {
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn command_line_has_svm_ports_forwards_and_read_only_disks() {
        let endpoints = Endpoints::in_dir(Path::new("/tmp/run,1"));
        let image = AttachedImage {
            artefact: Artefact {
                name: "rootfs-base".into(),
                path: "/c/base.ext4".into(),
                key: String::new(),
                size_bytes: 0,
            },
            serial: "roost0".into(),
        };
        let images = [(image, PathBuf::from("/c/base.ext4"))];
        let forwards = [
            Forward {
                host: 8080,
                guest: 80,
            },
            Forward {
                host: 2222,
                guest: 22,
            },
        ];
        let args = host_vm_args(&QemuConfig {
            cpus: 2,
            mem_mib: 4096,
            kernel: Path::new("/k/vmlinuz"),
            initrd: Path::new("/t/initrd.cpio"),
            forwards: &forwards,
            images: &images,
            endpoints: &endpoints,
        });
        let line = joined(&args);
        assert!(
            line.contains("-accel tcg,thread=multi -cpu EPYC,+svm -smp 2 -m 4096"),
            "{line}"
        );
        assert!(line.contains("-no-reboot"), "{line}");
        assert!(
            line.contains("hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.1:2222-:22"),
            "{line}"
        );
        assert!(
            line.contains("path=/tmp/run,,1/control.sock,server=on,wait=off"),
            "{line}"
        );
        assert!(
            line.contains("name=roost.stdout") && line.contains("name=roost.stderr"),
            "{line}"
        );
        assert!(
            line.contains("file=/c/base.ext4,format=raw,if=none,id=img0,readonly=on"),
            "{line}"
        );
        assert!(
            line.contains("virtio-blk-pci,drive=img0,serial=roost0"),
            "{line}"
        );
        assert!(line.contains("rdinit=/init"), "{line}");
    }

    #[test]
    fn no_forwards_still_gives_user_networking() {
        let endpoints = Endpoints::in_dir(Path::new("/t"));
        let args = host_vm_args(&QemuConfig {
            cpus: 1,
            mem_mib: 512,
            kernel: Path::new("/k"),
            initrd: Path::new("/i"),
            forwards: &[],
            images: &[],
            endpoints: &endpoints,
        });
        let line = joined(&args);
        assert!(
            line.contains("-netdev user,id=net0 -device virtio-net-pci"),
            "{line}"
        );
        assert!(!line.contains("-drive"), "{line}");
    }
}
