//! The vCPU and device seccomp filters refuse syscalls outside their allowlists. No KVM needed:
//! a forked child installs the real filter and tries a forbidden syscall; the parent checks how
//! the child ended (the filters kill the whole process with SIGSYS).

use roost_vmm::config::SeccompMode;
use roost_vmm::seccomp::{ThreadKind, compile};

/// What the child ended with.
#[derive(Debug, PartialEq, Eq)]
enum ChildEnd {
    Exited(i32),
    Signalled(i32),
}

/// Forks; the child installs `kind`'s filter, runs `attempt` and exits with its result. Only
/// async-signal-safe work happens in the child (the filter is compiled before the fork).
fn in_filtered_child(kind: ThreadKind, mode: SeccompMode, attempt: fn() -> i32) -> ChildEnd {
    let program = compile(kind, mode).unwrap().expect("a filter");
    // SAFETY: the child only calls prctl/seccomp (through apply_filter, which does not
    // allocate), the attempted syscall and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let code = match seccompiler::apply_filter(&program) {
            Ok(()) => attempt(),
            Err(_) => 100,
        };
        // SAFETY: _exit never returns and is async-signal-safe.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child; `status` is a valid out-pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(waited, pid);
    if libc::WIFSIGNALED(status) {
        ChildEnd::Signalled(libc::WTERMSIG(status))
    } else {
        ChildEnd::Exited(libc::WEXITSTATUS(status))
    }
}

fn open_a_socket() -> i32 {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) };
    if fd >= 0 { 0 } else { 1 }
}

fn open_a_unix_socket() -> i32 {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_socket, libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    if fd >= 0 { 0 } else { 1 }
}

fn exec_a_shell() -> i32 {
    let path = c"/bin/true";
    let argv = [path.as_ptr(), std::ptr::null()];
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: NUL-terminated path and null-terminated argv/envp arrays that outlive the call.
    unsafe {
        libc::syscall(
            libc::SYS_execve,
            path.as_ptr(),
            argv.as_ptr(),
            envp.as_ptr(),
        )
    };
    2
}

fn write_to_stderr() -> i32 {
    // SAFETY: writes zero bytes from a valid (empty) buffer.
    let n = unsafe { libc::syscall(libc::SYS_write, 2, c"".as_ptr(), 0) };
    if n == 0 { 0 } else { 3 }
}

fn ioctl_other_than_kvm_run() -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD on stdin writes one c_int to a valid pointer.
    unsafe { libc::syscall(libc::SYS_ioctl, 0, libc::FIONREAD, &mut n) };
    4
}

#[test]
fn a_vcpu_thread_may_not_open_a_socket() {
    assert_eq!(
        in_filtered_child(ThreadKind::Vcpu, SeccompMode::Enforce, open_a_socket),
        ChildEnd::Signalled(libc::SIGSYS)
    );
}

#[test]
fn a_vcpu_thread_may_not_exec() {
    assert_eq!(
        in_filtered_child(ThreadKind::Vcpu, SeccompMode::Enforce, exec_a_shell),
        ChildEnd::Signalled(libc::SIGSYS)
    );
}

#[test]
fn a_vcpu_thread_may_not_make_non_kvm_ioctls() {
    assert_eq!(
        in_filtered_child(
            ThreadKind::Vcpu,
            SeccompMode::Enforce,
            ioctl_other_than_kvm_run
        ),
        ChildEnd::Signalled(libc::SIGSYS)
    );
}

#[test]
fn the_device_thread_may_open_unix_sockets_but_not_inet_ones() {
    assert_eq!(
        in_filtered_child(ThreadKind::Device, SeccompMode::Enforce, open_a_unix_socket),
        ChildEnd::Exited(0)
    );
    assert_eq!(
        in_filtered_child(ThreadKind::Device, SeccompMode::Enforce, open_a_socket),
        ChildEnd::Signalled(libc::SIGSYS)
    );
}

#[test]
fn allowed_syscalls_still_work_under_the_filter() {
    assert_eq!(
        in_filtered_child(ThreadKind::Vcpu, SeccompMode::Enforce, write_to_stderr),
        ChildEnd::Exited(0)
    );
}
