//! seccomp allowlists for the VMM's threads: each vCPU thread and the device event-loop thread
//! install one before touching guest-controlled input.
//!
//! The filters are written as Rust tables below and compiled to BPF with seccompiler when a VM is
//! built (microseconds; no build script, JSON file or second copy of the rules to keep in sync).
//! A syscall outside the list kills the whole VMM process (`SECCOMP_RET_KILL_PROCESS`, as
//! Firecracker does): a guest that subverted a device cannot retry. `SeccompMode::Log` allows and
//! audit-logs instead, to find a missing syscall during development.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::config::SeccompMode;

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("could not build the {0} seccomp filter")]
    Build(&'static str, #[source] seccompiler::BackendError),
    #[error("could not compile the {0} seccomp filter to BPF")]
    Compile(&'static str, #[source] seccompiler::BackendError),
    #[error("could not install a seccomp filter on this thread")]
    Install(#[source] seccompiler::Error),
}

/// `KVM_RUN` (`_IO(KVMIO, 0x80)`).
const KVM_RUN: u64 = 0xae80;

/// The KVM ioctl type byte.
const KVMIO: u32 = 0xae;

/// The vCPU `KVM_GET_*` ioctls a paused vCPU thread uses to save its state (`crate::state`);
/// numbers computed as kvm-ioctls does (its own table is private).
#[allow(non_snake_case, clippy::cast_possible_truncation)]
mod kvm_get {
    use super::KVMIO;
    use kvm_bindings::*;
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    vmm_sys_util::ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);

    /// Every vCPU state read.
    pub fn all() -> [u64; 11] {
        [
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
            KVM_GET_TSC_KHZ(),
        ]
        .map(u64::from)
    }
}

/// Syscalls every VMM thread needs: memory allocation, futexes, signals (the kick), time,
/// writing logs, closing fds and exiting.
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getrandom,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_fstat,
    libc::SYS_close,
    libc::SYS_dup,
    libc::SYS_fcntl,
    libc::SYS_eventfd2,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// What the device thread adds: epoll, file I/O for disks, Unix sockets for vsock.
const DEVICE_EXTRA: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_readv,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_preadv2,
    libc::SYS_pwritev2,
    libc::SYS_lseek,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_fallocate,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
];

/// The VM `KVM_GET_*` ioctls a snapshot needs on the API thread (`state::VmState::save`,
/// the dirty log for diff snapshots).
#[allow(non_snake_case, clippy::cast_possible_truncation)]
mod kvm_vm_get {
    use super::KVMIO;
    use kvm_bindings::*;
    vmm_sys_util::ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    vmm_sys_util::ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    vmm_sys_util::ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

    /// Every VM state read.
    pub fn all() -> [u64; 4] {
        [
            KVM_GET_IRQCHIP(),
            KVM_GET_PIT2(),
            KVM_GET_CLOCK(),
            KVM_GET_DIRTY_LOG(),
        ]
        .map(u64::from)
    }
}

/// What the API thread adds: its socket, the snapshot files, and the directory operations of
/// writing a memory chain (create, rename, remove, copy when merging).
const API_EXTRA: &[i64] = &[
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_accept,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_openat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_readv,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_getdents64,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_mincore,
    libc::SYS_msync,
    libc::SYS_fadvise64,
    libc::SYS_flock,
    libc::SYS_link,
    libc::SYS_linkat,
    libc::SYS_readlink,
    libc::SYS_readlinkat,
    libc::SYS_getcwd,
    libc::SYS_fstatfs,
    libc::SYS_statfs,
];

/// Which thread a filter is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs `KVM_RUN` and dispatches exits: only `KVM_RUN` and the vCPU state reads, no new
    /// sockets or files.
    Vcpu,
    /// The device event loop: epoll, disk I/O, Unix sockets (only `AF_UNIX` may be created).
    Device,
    /// The API socket's thread: accepts on its (already bound) socket, writes snapshot files,
    /// reads the VM's KVM state; creates no sockets, runs nothing.
    Api,
}

impl ThreadKind {
    fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vCPU",
            ThreadKind::Device => "device",
            ThreadKind::Api => "API",
        }
    }
}

fn arg_eq(index: u8, value: u64, name: &'static str) -> Result<SeccompCondition, SeccompError> {
    SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
        .map_err(|e| SeccompError::Build(name, e))
}

/// The rules of one thread kind: syscall number → conditions (an empty list allows it outright).
pub fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, SeccompError> {
    let name = kind.name();
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        COMMON.iter().map(|nr| (*nr, Vec::new())).collect();
    let rule = |conditions| SeccompRule::new(conditions).map_err(|e| SeccompError::Build(name, e));
    match kind {
        ThreadKind::Vcpu => {
            let ioctls = std::iter::once(KVM_RUN)
                .chain(kvm_get::all())
                .map(|request| rule(vec![arg_eq(1, request, name)?]))
                .collect::<Result<Vec<_>, _>>()?;
            rules.insert(libc::SYS_ioctl, ioctls);
        }
        ThreadKind::Device => {
            rules.extend(DEVICE_EXTRA.iter().map(|nr| (*nr, Vec::new())));
            let unix = u64::try_from(libc::AF_UNIX).unwrap_or(u64::MAX);
            rules.insert(libc::SYS_socket, vec![rule(vec![arg_eq(0, unix, name)?])?]);
            let (fionbio, fionread) = (libc::FIONBIO, libc::FIONREAD);
            rules.insert(
                libc::SYS_ioctl,
                vec![
                    rule(vec![arg_eq(1, fionbio, name)?])?,
                    rule(vec![arg_eq(1, fionread, name)?])?,
                ],
            );
        }
        ThreadKind::Api => {
            rules.extend(API_EXTRA.iter().map(|nr| (*nr, Vec::new())));
            // Pause and snapshot kick the vCPU threads out of `KVM_RUN` with `pthread_kill`,
            // which is `tgkill(getpid(), tid, sig)`: only the kick signal may be sent.
            rules.insert(libc::SYS_getpid, Vec::new());
            let kick = u64::try_from(crate::vcpu::kick_signal()).unwrap_or(u64::MAX);
            rules.insert(libc::SYS_tgkill, vec![rule(vec![arg_eq(2, kick, name)?])?]);
            let ioctls = kvm_vm_get::all()
                .into_iter()
                .chain([libc::FIONBIO])
                .map(|request| rule(vec![arg_eq(1, request, name)?]))
                .collect::<Result<Vec<_>, _>>()?;
            rules.insert(libc::SYS_ioctl, ioctls);
        }
    }
    Ok(rules)
}

/// Compiles the filter for `kind`; `None` when seccomp is off.
pub fn compile(kind: ThreadKind, mode: SeccompMode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Enforce => SeccompAction::KillProcess,
        SeccompMode::Log => SeccompAction::Log,
        SeccompMode::Off => return Ok(None),
    };
    let filter = SeccompFilter::new(
        rules(kind)?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| SeccompError::Build(kind.name(), e))?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|e| SeccompError::Compile(kind.name(), e))?;
    Ok(Some(program))
}

/// Installs `program` on the calling thread (threads it creates later inherit it). Needs
/// `no_new_privs` (see `privileges`) unless the process has `CAP_SYS_ADMIN`.
pub fn install(program: Option<&BpfProgram>) -> Result<(), SeccompError> {
    match program {
        Some(program) => seccompiler::apply_filter(program).map_err(SeccompError::Install),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpu_threads_may_not_open_sockets_or_exec() {
        let rules = rules(ThreadKind::Vcpu).unwrap();
        for forbidden in [
            libc::SYS_socket,
            libc::SYS_execve,
            libc::SYS_openat,
            libc::SYS_open,
            libc::SYS_connect,
            libc::SYS_ptrace,
            libc::SYS_clone,
        ] {
            assert!(
                !rules.contains_key(&forbidden),
                "syscall {forbidden} allowed"
            );
        }
        assert_eq!(
            rules[&libc::SYS_ioctl].len(),
            12,
            "KVM_RUN and 11 KVM_GET_*"
        );
        assert_eq!(
            kvm_get::KVM_GET_REGS(),
            0x8090_ae81,
            "matches <linux/kvm.h>"
        );
        assert_eq!(
            kvm_get::KVM_GET_MSRS(),
            0xc008_ae88,
            "matches <linux/kvm.h>"
        );
    }

    #[test]
    fn device_thread_may_only_create_unix_sockets() {
        let rules = rules(ThreadKind::Device).unwrap();
        assert_eq!(rules[&libc::SYS_socket].len(), 1);
        assert!(!rules.contains_key(&libc::SYS_execve));
        assert!(!rules.contains_key(&libc::SYS_openat));
        assert!(rules.contains_key(&libc::SYS_epoll_wait));
    }

    #[test]
    fn the_api_thread_writes_files_but_creates_no_sockets_and_runs_nothing() {
        let rules = rules(ThreadKind::Api).unwrap();
        for forbidden in [
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_ptrace,
        ] {
            assert!(
                !rules.contains_key(&forbidden),
                "syscall {forbidden} allowed"
            );
        }
        assert!(rules.contains_key(&libc::SYS_openat));
        assert_eq!(rules[&libc::SYS_ioctl].len(), 5, "4 KVM_GET_* and FIONBIO");
        assert_eq!(
            rules[&libc::SYS_tgkill].len(),
            1,
            "pause kicks vCPU threads, with the kick signal only"
        );
        assert!(!rules.contains_key(&libc::SYS_kill));
        assert_eq!(
            kvm_vm_get::KVM_GET_CLOCK(),
            0x8030_ae7c,
            "matches <linux/kvm.h>"
        );
        assert_eq!(
            kvm_vm_get::KVM_GET_DIRTY_LOG(),
            0x4010_ae42,
            "matches <linux/kvm.h>"
        );
    }

    #[test]
    fn every_mode_compiles() {
        for kind in [ThreadKind::Vcpu, ThreadKind::Device, ThreadKind::Api] {
            assert!(compile(kind, SeccompMode::Enforce).unwrap().is_some());
            assert!(compile(kind, SeccompMode::Log).unwrap().is_some());
            assert!(compile(kind, SeccompMode::Off).unwrap().is_none());
        }
    }
}
