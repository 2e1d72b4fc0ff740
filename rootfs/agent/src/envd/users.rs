//! Unix accounts the API acts as: looked up in the passwd/group databases on every request (a
//! template may add users at any time), with the supplementary groups a login would get.

use std::ffi::CString;
use std::path::PathBuf;

use nix::unistd::{Gid, Group, Uid, User};

use super::connect::{Code, ConnectError};

/// A user to run processes and file operations as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups (including the primary one), as `initgroups` would set.
    pub groups: Vec<Gid>,
    pub home: PathBuf,
    pub shell: PathBuf,
}

impl Account {
    /// Looks `name` up; an unknown user is an authentication error, as in envd.
    pub fn lookup(name: &str) -> Result<Self, ConnectError> {
        let user = User::from_name(name)
            .map_err(|e| ConnectError::internal(format!("looking up user `{name}`: {e}")))?
            .ok_or_else(|| {
                ConnectError::new(
                    Code::Unauthenticated,
                    format!("user `{name}` does not exist"),
                )
            })?;
        let groups = CString::new(name)
            .ok()
            .and_then(|c_name| nix::unistd::getgrouplist(&c_name, user.gid).ok())
            .unwrap_or_else(|| vec![user.gid]);
        Ok(Self {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            groups,
            home: user.dir,
            shell: user.shell,
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid.is_root()
    }
}

/// The name of a user id, or the number when it has no passwd entry.
pub fn user_name(uid: u32) -> String {
    User::from_uid(Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| uid.to_string(), |u| u.name)
}

/// The name of a group id, or the number when it has no group entry.
pub fn group_name(gid: u32) -> String {
    Group::from_gid(Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| gid.to_string(), |g| g.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_exists_and_unknown_users_are_unauthenticated() {
        let root = Account::lookup("root").unwrap();
        assert!(root.is_root());
        assert!(root.groups.contains(&Gid::from_raw(0)));
        assert_eq!(user_name(0), "root");
        assert_eq!(group_name(0), "root");
        assert_eq!(user_name(4_000_000_001), "4000000001");
        let error = Account::lookup("no-such-user-roost").unwrap_err();
        assert_eq!(error.code, Code::Unauthenticated);
    }
}
