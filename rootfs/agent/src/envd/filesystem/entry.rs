//! `EntryInfo`: what the API says about a file, from `lstat` (a symlink is reported as one,
//! with its target).

use std::fs::Metadata;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use crate::envd::connect::ConnectError;
use crate::envd::proto::filesystem::{EntryInfo, FileType};
use crate::envd::users::{group_name, user_name};

/// Describes `path` (not following a final symlink).
pub fn entry_info(path: &Path) -> Result<EntryInfo, ConnectError> {
    let metadata = std::fs::symlink_metadata(path)
        .map_err(|e| ConnectError::from_io(&path.display().to_string(), &e))?;
    Ok(from_metadata(path, &metadata))
}

pub fn from_metadata(path: &Path, metadata: &Metadata) -> EntryInfo {
    let file_type = metadata.file_type();
    let is_symlink = file_type.is_symlink();
    let kind = if is_symlink {
        FileType::Symlink
    } else if file_type.is_dir() {
        FileType::Directory
    } else {
        FileType::File
    };
    let symlink_target = is_symlink.then(|| {
        std::fs::read_link(path).map_or_else(
            |_| String::new(),
            |target| {
                let absolute = match path.parent() {
                    Some(parent) if target.is_relative() => parent.join(&target),
                    _ => target,
                };
                crate::envd::paths::normalise(&absolute)
                    .to_string_lossy()
                    .into_owned()
            },
        )
    });
    let mode = metadata.permissions().mode();
    EntryInfo {
        name: path
            .file_name()
            .map_or_else(|| "/".to_owned(), |n| n.to_string_lossy().into_owned()),
        r#type: kind.into(),
        path: path.to_string_lossy().into_owned(),
        size: i64::try_from(metadata.len()).unwrap_or(i64::MAX),
        mode: mode & 0o7777,
        permissions: permissions_string(mode),
        owner: user_name(metadata.uid()),
        group: group_name(metadata.gid()),
        modified_time: Some(pbjson_types::Timestamp {
            seconds: metadata.mtime(),
            nanos: i32::try_from(metadata.mtime_nsec()).unwrap_or(0),
        }),
        symlink_target,
        metadata: super::metadata::read(path),
        is_symlink,
    }
}

/// `ls -l` style, like Go's `FileMode.String()` for the common types (`drwxr-xr-x`).
pub fn permissions_string(mode: u32) -> String {
    let kind = match mode & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFLNK => 'L',
        libc::S_IFIFO => 'p',
        libc::S_IFSOCK => 'S',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'D',
        _ => '-',
    };
    let mut text = String::with_capacity(10);
    text.push(kind);
    for (bit, c) in [
        (0o400, 'r'),
        (0o200, 'w'),
        (0o100, 'x'),
        (0o040, 'r'),
        (0o020, 'w'),
        (0o010, 'x'),
        (0o004, 'r'),
        (0o002, 'w'),
        (0o001, 'x'),
    ] {
        text.push(if mode & bit != 0 { c } else { '-' });
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permission_strings() {
        assert_eq!(permissions_string(libc::S_IFDIR | 0o755), "drwxr-xr-x");
        assert_eq!(permissions_string(libc::S_IFREG | 0o640), "-rw-r-----");
        assert_eq!(permissions_string(libc::S_IFLNK | 0o777), "Lrwxrwxrwx");
    }

    #[test]
    fn files_dirs_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f.txt");
        std::fs::write(&file, b"12345").unwrap();
        std::os::unix::fs::symlink("f.txt", dir.path().join("link")).unwrap();
        let info = entry_info(&file).unwrap();
        assert_eq!(
            (info.name.as_str(), info.size, info.r#type),
            ("f.txt", 5, FileType::File as i32)
        );
        let link = entry_info(&dir.path().join("link")).unwrap();
        assert!(link.is_symlink);
        assert_eq!(link.r#type, FileType::Symlink as i32);
        assert_eq!(link.symlink_target.as_deref(), Some(file.to_str().unwrap()));
        assert_eq!(
            entry_info(dir.path()).unwrap().r#type,
            FileType::Directory as i32
        );
        assert_eq!(
            entry_info(&dir.path().join("missing")).unwrap_err().code,
            crate::envd::connect::Code::NotFound
        );
    }
}
