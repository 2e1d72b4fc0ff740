//! Turning a client's path into an absolute one.
//!
//! Relative paths (and `~`, `~/...`) resolve against the user's home, or the sandbox's default
//! workdir when one is set (as envd does); `.` and `..` are folded lexically. That is all the
//! policy there is at this level: *what* a path may reach is decided by the kernel, because
//! every file operation runs with the user's credentials ([`super::fsuser`]), so `..` or a
//! symlink can only lead where that user could go anyway.

use std::path::{Component, Path, PathBuf};

use super::connect::ConnectError;
use super::users::Account;

/// Resolves `path` for `account`. An empty path is the base directory itself.
pub fn resolve(
    path: &str,
    account: &Account,
    default_workdir: Option<&Path>,
) -> Result<PathBuf, ConnectError> {
    if path.contains('\0') {
        return Err(ConnectError::invalid("path contains a NUL byte"));
    }
    let base = default_workdir.unwrap_or(&account.home);
    let joined = if let Some(rest) = path.strip_prefix('~') {
        match rest.strip_prefix('/') {
            Some(rest) => account.home.join(rest),
            None if rest.is_empty() => account.home.clone(),
            // `~other` is not expanded: it is a relative name.
            None => base.join(path),
        }
    } else {
        base.join(path)
    };
    Ok(normalise(&joined))
}

/// Folds `.` and `..` without touching the filesystem; `..` at `/` stays at `/`.
pub fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for component in path.components() {
        match component {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::unistd::{Gid, Uid};

    fn account() -> Account {
        Account {
            name: "user".into(),
            uid: Uid::from_raw(1000),
            gid: Gid::from_raw(1000),
            groups: vec![],
            home: "/home/user".into(),
            shell: "/bin/bash".into(),
        }
    }

    #[test]
    fn relative_paths_resolve_against_home_or_workdir() {
        let a = account();
        let r = |p: &str, w: Option<&Path>| resolve(p, &a, w).unwrap();
        assert_eq!(r("x.txt", None), Path::new("/home/user/x.txt"));
        assert_eq!(r("", None), Path::new("/home/user"));
        assert_eq!(r("~", None), Path::new("/home/user"));
        assert_eq!(
            r("~/a/b", Some(Path::new("/srv"))),
            Path::new("/home/user/a/b")
        );
        assert_eq!(r("a/./b", Some(Path::new("/srv"))), Path::new("/srv/a/b"));
        assert_eq!(r("/etc/passwd", None), Path::new("/etc/passwd"));
        assert_eq!(r("~bob", None), Path::new("/home/user/~bob"));
    }

    #[test]
    fn dot_dot_folds_and_stops_at_root() {
        let a = account();
        assert_eq!(
            resolve("../../../../etc/shadow", &a, None).unwrap(),
            Path::new("/etc/shadow")
        );
        assert_eq!(resolve("/a/../..", &a, None).unwrap(), Path::new("/"));
        assert!(resolve("a\0b", &a, None).is_err());
    }
}
