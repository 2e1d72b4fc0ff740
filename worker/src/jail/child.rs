//! The jailed side, run in the forked child (PID 1 of its new PID namespace) until `execve`:
//! new mount, IPC, UTS and network namespaces (the tap, if any, is opened right after joining
//! the network one); the jail root becomes `/` through `pivot_root` (or, on an initramfs-only
//! host, a move over `/` and `chroot`); only the spec's bind mounts, a private `/dev` with the
//! listed device nodes and the writable directories are there; then the identity drops to the
//! unprivileged uid/gid (which clears every capability) and the program starts with a clean
//! environment and the tap as fd 3.

use std::ffi::CString;
use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};
use nix::sys::stat::{Mode, SFlag, mknod};
use nix::unistd::{
    Gid, Uid, chdir, chown, chroot, pivot_root, setgroups, sethostname, setresgid, setresuid,
};

use super::spec::JailSpec;

/// Where the old root is parked during `pivot_root` (inside the new root, removed after).
const OLD_ROOT: &str = ".roost-old-root";

/// Sets the jail up and execs the program; returns only with what went wrong.
pub fn enter(spec: &JailSpec, netns: Option<OwnedFd>) -> String {
    match setup(spec, netns) {
        Ok(tap) => exec(spec, tap),
        Err(message) => message,
    }
}

/// Returns the tap to hand over, when the spec names one.
fn setup(spec: &JailSpec, netns: Option<OwnedFd>) -> Result<Option<OwnedFd>, String> {
    let step = |what: &str| {
        let what = what.to_string();
        move |e: nix::Error| format!("{what}: {e}")
    };
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)
        .map_err(step("unshare mount/IPC/UTS namespaces"))?;
    match netns {
        Some(fd) => {
            setns(fd, CloneFlags::CLONE_NEWNET).map_err(step("join the network namespace"))?
        }
        None => unshare(CloneFlags::CLONE_NEWNET).map_err(step("unshare the network namespace"))?,
    }
    // Attaching to the sandbox's tap needs CAP_NET_ADMIN: done now, as root, in its namespace.
    let tap = spec.tap.as_deref().map(open_tap).transpose()?;
    // Nothing mounted from here on may propagate back to the host's mount namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make mounts private"))?;
    let root = &spec.root;
    mount(
        Some(root),
        root,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .map_err(step("bind the jail root"))?;

    // The private /dev first: device sources of bind mounts get their node made here.
    let dev = root.join("dev");
    fs::create_dir_all(&dev).map_err(|e| format!("create {}: {e}", dev.display()))?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )
    .map_err(step("mount /dev"))?;
    let (uid, gid) = (Uid::from_raw(spec.uid), Gid::from_raw(spec.gid));

    for (index, m) in spec.mounts.iter().enumerate() {
        let target = spec.host_path(&m.inside);
        let meta = fs::metadata(&m.host).map_err(|e| format!("stat {}: {e}", m.host.display()))?;
        make_mount_point(&m.host, &target)?;
        // A disk given as a device (a volume, or the host VM's attached images) cannot be a
        // plain bind mount: the host's node belongs to root, and a `nodev` mount refuses to
        // open it. The jail gets its own node for the same device, owned by the jailed
        // identity (mode 0400 when read-only), bound from the private /dev so that it also
        // works when the jail directory's file system is mounted `nodev`.
        let kind = if meta.file_type().is_block_device() {
            Some(SFlag::S_IFBLK)
        } else if meta.file_type().is_char_device() {
            Some(SFlag::S_IFCHR)
        } else {
            None
        };
        let source = match kind {
            Some(kind) => {
                let node = dev.join(format!(".mount-{index}"));
                let mode = if m.read_only { 0o400 } else { 0o600 };
                mknod(&node, kind, Mode::from_bits_truncate(mode), meta.rdev())
                    .map_err(step(&format!("mknod for {}", m.host.display())))?;
                chown(&node, Some(uid), Some(gid))
                    .map_err(step(&format!("chown the node for {}", m.host.display())))?;
                node
            }
            None => m.host.clone(),
        };
        mount(
            Some(&source),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(step(&format!("bind {}", m.host.display())))?;
        let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID;
        if kind.is_none() {
            flags |= MsFlags::MS_NODEV;
        }
        if m.read_only {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(None::<&str>, &target, None::<&str>, flags, None::<&str>)
            .map_err(step(&format!("remount {}", m.inside.display())))?;
    }

    for device in &spec.devices {
        let meta = fs::metadata(device).map_err(|e| format!("stat {}: {e}", device.display()))?;
        let target = spec.host_path(device);
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent).map_err(|e| format!("create {}: {e}", parent.display()))?;
        }
        let kind = if meta.file_type().is_block_device() {
            SFlag::S_IFBLK
        } else {
            SFlag::S_IFCHR
        };
        mknod(&target, kind, Mode::from_bits_truncate(0o600), meta.rdev())
            .map_err(step(&format!("mknod {}", device.display())))?;
        chown(&target, Some(uid), Some(gid))
            .map_err(step(&format!("chown {}", device.display())))?;
    }

    for dir in &spec.writable_dirs {
        let target = spec.host_path(dir);
        fs::create_dir_all(&target).map_err(|e| format!("create {}: {e}", target.display()))?;
        chown(&target, Some(uid), Some(gid)).map_err(step(&format!("chown {}", dir.display())))?;
        fs::set_permissions(&target, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", target.display()))?;
    }

    sethostname(&spec.hostname).map_err(step("set the host name"))?;

    chdir(root).map_err(step("enter the jail root"))?;
    fs::create_dir_all(OLD_ROOT).map_err(|e| format!("create {OLD_ROOT}: {e}"))?;
    match pivot_root(".", OLD_ROOT) {
        Ok(()) => {
            chdir("/").map_err(step("chdir /"))?;
            umount2(&*format!("/{OLD_ROOT}"), MntFlags::MNT_DETACH)
                .map_err(step("detach the old root"))?;
            fs::remove_dir(format!("/{OLD_ROOT}"))
                .map_err(|e| format!("remove {OLD_ROOT}: {e}"))?;
        }
        // The host's root is the initial ramfs (an initramfs-only host such as the host VM),
        // which pivot_root refuses to move.
        Err(nix::Error::EINVAL) => {
            fs::remove_dir(OLD_ROOT).map_err(|e| format!("remove {OLD_ROOT}: {e}"))?;
            move_root(root)?;
        }
        Err(e) => return Err(format!("pivot_root: {e}")),
    }

    // Dropping root's uid clears the permitted and effective capability sets.
    setgroups(&[gid]).map_err(step("set supplementary groups"))?;
    setresgid(gid, gid, gid).map_err(step("set gid"))?;
    setresuid(uid, uid, uid).map_err(step("set uid"))?;
    // After the uid change (which resets it): the program dies with its jailer.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
        .map_err(step("set the parent-death signal"))?;
    // No exec inside the jail can gain privileges (setuid files, file capabilities).
    nix::sys::prctl::set_no_new_privs().map_err(step("set no_new_privs"))?;
    Ok(tap)
}

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags (the union's other members
/// are larger, hence the padding).
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: nix::libc::c_short,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(
    tunsetiff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<nix::libc::c_int>()),
    IfReq
);

/// Attaches to the existing tap `name` of the current network namespace the way the VMM
/// would (`IFF_TAP | IFF_NO_PI`, no vnet header; see roost-vmm's `net::tap`).
fn open_tap(name: &str) -> Result<OwnedFd, String> {
    let tun = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(|e| format!("open /dev/net/tun: {e}"))?;
    let flags = nix::libc::c_short::try_from(nix::libc::IFF_TAP | nix::libc::IFF_NO_PI)
        .map_err(|_| "IFF_TAP | IFF_NO_PI does not fit ifr_flags".to_string())?;
    let mut req = IfReq {
        name: [0; 16],
        flags,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a `struct ifreq`, which `IfReq` lays out (name, flags, padding
    // to the union's size), from a live, exclusively borrowed value; `tun` is an open fd.
    unsafe { tunsetiff(tun.as_raw_fd(), &req) }
        .map_err(|e| format!("attach to tap {name}: {e}"))?;
    Ok(OwnedFd::from(tun))
}

/// The `pivot_root` replacement for a host whose root is the initial ramfs (what runc does
/// there): every mount of this (private) namespace outside the jail is detached, the jail's
/// mount is moved over `/` and becomes the root with `chroot`. Mounts on the jail's ancestors
/// stay but are hidden under it; the program cannot climb out of the chroot because it ends
/// up without CAP_SYS_CHROOT (and without any other capability).
fn move_root(root: &Path) -> Result<(), String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("read /proc/self/mountinfo: {e}"))?;
    let mut outside: Vec<std::path::PathBuf> = super::mount_points(&mountinfo)
        .into_iter()
        .filter(|p| !p.starts_with(root) && !root.starts_with(p))
        .collect();
    // Deepest first, so each unmount finds its children gone already.
    outside.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in &outside {
        match umount2(point, MntFlags::MNT_DETACH) {
            // Already gone with a parent detached before it.
            Ok(()) | Err(nix::Error::EINVAL) | Err(nix::Error::ENOENT) => {}
            Err(e) => return Err(format!("detach {}: {e}", point.display())),
        }
    }
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("move the jail root over /: {e}"))?;
    chroot(".").map_err(|e| format!("chroot: {e}"))?;
    chdir("/").map_err(|e| format!("chdir /: {e}"))
}

fn exec(spec: &JailSpec, tap: Option<OwnedFd>) -> String {
    if let Some(tap) = tap {
        // dup2 gives the copy no FD_CLOEXEC; the original (close-on-exec) goes at exec.
        if tap.as_raw_fd() == super::TAP_FD {
            if let Err(e) = nix::fcntl::fcntl(
                &tap,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()),
            ) {
                return format!("keep the tap open across exec: {e}");
            }
            std::mem::forget(tap);
        } else {
            // SAFETY: dup2 onto TAP_FD, which the report pipe was moved away from; nothing else
            // in this single-threaded child holds TAP_FD as an owned descriptor.
            if unsafe { nix::libc::dup2(tap.as_raw_fd(), super::TAP_FD) } < 0 {
                return format!("hand the tap over: {}", std::io::Error::last_os_error());
            }
        }
    }
    let to_c = |bytes: &[u8]| {
        CString::new(bytes)
            .map_err(|_| "a NUL byte in the program, an argument or the environment".to_string())
    };
    let run = || -> Result<std::convert::Infallible, String> {
        let program = to_c(spec.program.as_os_str().as_bytes())?;
        let mut argv = vec![program.clone()];
        for arg in &spec.args {
            argv.push(to_c(arg.as_bytes())?);
        }
        let env = spec
            .env
            .iter()
            .map(|(k, v)| {
                let mut kv = k.as_bytes().to_vec();
                kv.push(b'=');
                kv.extend_from_slice(v.as_bytes());
                to_c(&kv)
            })
            .collect::<Result<Vec<_>, _>>()?;
        nix::unistd::execve(&program, &argv, &env)
            .map_err(|e| format!("exec {} inside the jail: {e}", spec.program.display()))
    };
    match run() {
        Ok(never) => match never {},
        Err(message) => message,
    }
}

/// Creates the empty file or directory a bind mount of `source` needs at `target`.
fn make_mount_point(source: &Path, target: &Path) -> Result<(), String> {
    let err = |e: std::io::Error| format!("create {}: {e}", target.display());
    if let Some(parent) = target.parent() {
        fs::create_dir_all(parent).map_err(err)?;
    }
    if source.is_dir() {
        fs::create_dir_all(target).map_err(err)
    } else {
        File::create(target).map(drop).map_err(err)
    }
}
