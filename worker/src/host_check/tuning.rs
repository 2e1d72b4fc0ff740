//! Host settings that make VM creation an order of magnitude slower without breaking anything.
//!
//! Both checks concern the same stall (documented by Firecracker's production host setup for
//! 6.1 kernels): with `kvm.nx_huge_pages` on, every `KVM_CREATE_VM` starts a
//! `kvm-nx-lpage-recovery` kernel thread and moves it into the VMM's cgroup. That move takes
//! `cgroup_threadgroup_rwsem`, a per-CPU rw-semaphore which, since 6.0, favours readers: a
//! writer waits for an RCU grace period, tens of milliseconds per VM. Mounting cgroup v2 with
//! `favordynmods` makes writers cheap again; on CPUs not affected by iTLB multihit the
//! mitigation (and its thread) can be turned off altogether with `kvm.nx_huge_pages=never`.
//!
//! The decisions are pure functions of the texts read from `/proc` and `/sys`, so they are
//! tested without a host in that state.

use super::{Check, Status};

/// The `favordynmods` cgroup v2 check: `features` is `/sys/kernel/cgroup/features` (absent on
/// kernels without the option), `mountinfo` is `/proc/self/mountinfo`.
pub fn check_favordynmods(features: Option<&str>, mountinfo: &str) -> Check {
    const NAME: &str = "cgroup-favordynmods";
    let supported = features.is_some_and(|f| f.split_whitespace().any(|w| w == "favordynmods"));
    if !supported {
        return Check::new(
            NAME,
            Status::Ok,
            "this kernel has no favordynmods option (it predates the slow path)",
            "none",
        );
    }
    let Some((mount_point, options)) = cgroup2_mount(mountinfo) else {
        return Check::new(
            NAME,
            Status::Ok,
            "no cgroup v2 mount to tune (see the cgroup-v2 check)",
            "none",
        );
    };
    if options.split(',').any(|o| o == "favordynmods") {
        Check::new(
            NAME,
            Status::Ok,
            format!("cgroup v2 at {mount_point} is mounted with favordynmods"),
            "none",
        )
    } else {
        Check::new(
            NAME,
            Status::Warn,
            format!(
                "cgroup v2 at {mount_point} is mounted without favordynmods: creating a VM can wait tens of ms on cgroup_threadgroup_rwsem"
            ),
            format!(
                "`mount -o remount,favordynmods {mount_point}` (persist it in the boot's mount options)"
            ),
        )
    }
}

/// The `kvm.nx_huge_pages` check: `parameter` is `/sys/module/kvm/parameters/nx_huge_pages`
/// (absent when kvm is not loaded), `itlb_multihit` is
/// `/sys/devices/system/cpu/vulnerabilities/itlb_multihit`.
pub fn check_nx_huge_pages(parameter: Option<&str>, itlb_multihit: Option<&str>) -> Check {
    const NAME: &str = "kvm-nx-huge-pages";
    let Some(value) = parameter.map(str::trim) else {
        return Check::new(NAME, Status::Ok, "the kvm module is not loaded", "none");
    };
    let enabled = matches!(value, "Y" | "y" | "1" | "force" | "auto");
    if !enabled {
        return Check::new(
            NAME,
            Status::Ok,
            format!("kvm.nx_huge_pages={value}: no recovery thread per VM"),
            "none",
        );
    }
    let affected = itlb_multihit
        .map(str::trim)
        .is_none_or(|s| !s.starts_with("Not affected"));
    if affected {
        Check::new(
            NAME,
            Status::Ok,
            format!("kvm.nx_huge_pages={value}, needed here: the CPU is affected by iTLB multihit"),
            "keep it; mount cgroup v2 with favordynmods so the per-VM recovery thread is cheap",
        )
    } else {
        Check::new(
            NAME,
            Status::Warn,
            format!(
                "kvm.nx_huge_pages={value} on a CPU not affected by iTLB multihit: every VM gets a kvm-nx-lpage-recovery thread for nothing"
            ),
            "boot with kvm.nx_huge_pages=never (or `options kvm nx_huge_pages=never` in /etc/modprobe.d before kvm loads)",
        )
    }
}

/// The first cgroup2 mount's mount point and its super-block options (where `favordynmods`
/// shows).
fn cgroup2_mount(mountinfo: &str) -> Option<(&str, &str)> {
    mountinfo.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut right = right.split_whitespace();
        if right.next()? != "cgroup2" {
            return None;
        }
        let super_options = right.nth(1).unwrap_or("");
        let mount_point = left.split_whitespace().nth(4)?;
        Some((mount_point, super_options))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const FEATURES: &str = "nsdelegate\nfavordynmods\nmemory_localevents\n";
    const PLAIN: &str = "41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate\n";
    const TUNED: &str =
        "41 31 0:38 / /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw,nsdelegate,favordynmods\n";

    #[test]
    fn warns_when_the_kernel_has_favordynmods_and_the_mount_lacks_it() {
        let check = check_favordynmods(Some(FEATURES), PLAIN);
        assert_eq!(check.status, Status::Warn);
        assert!(
            check
                .recommendation
                .contains("remount,favordynmods /sys/fs/cgroup"),
            "{}",
            check.recommendation
        );
    }

    #[test]
    fn favordynmods_mount_or_old_kernel_is_fine() {
        assert_eq!(check_favordynmods(Some(FEATURES), TUNED).status, Status::Ok);
        assert_eq!(check_favordynmods(None, PLAIN).status, Status::Ok);
        assert_eq!(
            check_favordynmods(Some("nsdelegate\n"), PLAIN).status,
            Status::Ok
        );
        assert_eq!(check_favordynmods(Some(FEATURES), "").status, Status::Ok);
    }

    #[test]
    fn the_mount_option_is_read_from_the_super_block_options() {
        // favordynmods among the per-mount options (left of " - ") does not count.
        let misplaced = "41 31 0:38 / /sys/fs/cgroup rw,favordynmods - cgroup2 cgroup2 rw\n";
        assert_eq!(
            check_favordynmods(Some(FEATURES), misplaced).status,
            Status::Warn
        );
    }

    #[test]
    fn nx_huge_pages_on_an_unaffected_cpu_warns() {
        let check = check_nx_huge_pages(Some("Y\n"), Some("Not affected\n"));
        assert_eq!(check.status, Status::Warn);
        assert!(check.recommendation.contains("kvm.nx_huge_pages=never"));
        let auto = check_nx_huge_pages(Some("auto"), Some("Not affected"));
        assert_eq!(auto.status, Status::Warn);
    }

    #[test]
    fn nx_huge_pages_is_fine_when_off_needed_or_absent() {
        assert_eq!(
            check_nx_huge_pages(Some("N\n"), Some("Not affected")).status,
            Status::Ok
        );
        assert_eq!(
            check_nx_huge_pages(Some("never"), Some("Not affected")).status,
            Status::Ok
        );
        let needed = check_nx_huge_pages(Some("Y"), Some("KVM: Mitigation: Split huge pages"));
        assert_eq!(needed.status, Status::Ok);
        assert!(needed.recommendation.contains("favordynmods"));
        assert_eq!(check_nx_huge_pages(None, None).status, Status::Ok);
        // Unknown vulnerability state: assume affected, keep the mitigation.
        assert_eq!(check_nx_huge_pages(Some("Y"), None).status, Status::Ok);
    }
}
