//! Is the cgroup v2 hierarchy mounted with the controllers per-sandbox limits need?
//!
//! Hosts in "hybrid" mode mount cgroup2 (often at `/sys/fs/cgroup/unified`) while cgroup v1
//! holds the cpu, memory, io and pids controllers; limits cannot be set through v2 there.

use super::{Check, Status};

/// Controllers the worker uses for per-sandbox limits.
pub const REQUIRED_CONTROLLERS: [&str; 4] = ["cpu", "memory", "io", "pids"];

/// Mount points of cgroup2 file systems in a `/proc/self/mountinfo` text.
pub fn cgroup2_mount_points(mountinfo: &str) -> Vec<&str> {
    mountinfo
        .lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let fstype = right.split_whitespace().next()?;
            (fstype == "cgroup2")
                .then(|| left.split_whitespace().nth(4))
                .flatten()
        })
        .collect()
}

/// Checks cgroup v2 given the mountinfo text and a reader of `cgroup.controllers` per mount.
pub fn check_cgroup_v2(mountinfo: &str, controllers_at: impl Fn(&str) -> Option<String>) -> Check {
    let mounts = cgroup2_mount_points(mountinfo);
    let Some(&mount) = mounts.first() else {
        return Check::new(
            "cgroup-v2",
            Status::Fail,
            "no cgroup2 file system is mounted",
            "mount it (`mount -t cgroup2 none /sys/fs/cgroup`) or boot with systemd.unified_cgroup_hierarchy=1",
        );
    };
    let available = controllers_at(mount).unwrap_or_default();
    let available: Vec<&str> = available.split_whitespace().collect();
    let missing: Vec<&str> = REQUIRED_CONTROLLERS
        .iter()
        .copied()
        .filter(|c| !available.contains(c))
        .collect();
    if missing.is_empty() {
        Check::new(
            "cgroup-v2",
            Status::Ok,
            format!(
                "cgroup v2 at {mount} with {}",
                REQUIRED_CONTROLLERS.join(", ")
            ),
            "none: per-sandbox limits are available",
        )
    } else {
        Check::new(
            "cgroup-v2",
            Status::Warn,
            format!(
                "cgroup v2 at {mount} lacks the {} controller(s) (held by cgroup v1: hybrid mode)",
                missing.join(", ")
            ),
            "boot with systemd.unified_cgroup_hierarchy=1 (or cgroup_no_v1=all), or run the worker in the host VM (`roost hostvm run`)",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
31 30 0:27 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
40 30 0:35 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    const UNIFIED: &str = "35 25 0:30 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";

    #[test]
    fn finds_cgroup2_mount_points() {
        assert_eq!(cgroup2_mount_points(HYBRID), ["/sys/fs/cgroup/unified"]);
        assert_eq!(cgroup2_mount_points(UNIFIED), ["/sys/fs/cgroup"]);
        assert!(cgroup2_mount_points("").is_empty());
    }

    #[test]
    fn hybrid_mode_warns_with_missing_controllers() {
        let check = check_cgroup_v2(HYBRID, |_| Some("hugetlb\n".into()));
        assert_eq!(check.status, Status::Warn);
        assert!(
            check.finding.contains("cpu, memory, io, pids"),
            "{}",
            check.finding
        );
    }

    #[test]
    fn unified_with_controllers_is_ok() {
        let check = check_cgroup_v2(UNIFIED, |m| {
            assert_eq!(m, "/sys/fs/cgroup");
            Some("cpuset cpu io memory hugetlb pids rdma misc\n".into())
        });
        assert_eq!(check.status, Status::Ok);
    }

    #[test]
    fn no_cgroup2_fails() {
        assert_eq!(check_cgroup_v2("", |_| None).status, Status::Fail);
    }
}
