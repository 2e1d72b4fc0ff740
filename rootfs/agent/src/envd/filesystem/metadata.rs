//! User metadata on files, as envd keeps it: each `X-Metadata-<key>: <value>` upload header
//! becomes an extended attribute `user.e2b.<key>` (key lower-cased) on the written file, an
//! upload replaces the whole set, and `EntryInfo.metadata` shows them with the prefix stripped.
//! A filesystem without user xattrs (e.g. /proc) keeps the file and drops the metadata.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use axum::http::HeaderMap;

const HEADER_PREFIX: &str = "x-metadata-";
const XATTR_PREFIX: &str = "user.e2b.";
/// Linux limits: 255-byte attribute names, 64 KiB values.
const MAX_NAME: usize = 255;
const MAX_VALUE: usize = 64 * 1024;

/// The metadata an upload's headers carry; an error names the bad header.
pub fn from_headers(headers: &HeaderMap) -> Result<HashMap<String, String>, String> {
    let mut metadata = HashMap::new();
    for (name, value) in headers {
        let Some(key) = name.as_str().strip_prefix(HEADER_PREFIX) else {
            continue;
        };
        if key.is_empty() || XATTR_PREFIX.len() + key.len() > MAX_NAME {
            return Err(format!("invalid metadata key `{key}`"));
        }
        let value = value
            .to_str()
            .map_err(|_| format!("metadata value of `{key}` is not printable ASCII"))?;
        if value.len() > MAX_VALUE {
            return Err(format!(
                "metadata value of `{key}` exceeds {MAX_VALUE} bytes"
            ));
        }
        // Header names arrive lower-cased already; the first value wins, as in envd.
        metadata
            .entry(key.to_owned())
            .or_insert_with(|| value.to_owned());
    }
    Ok(metadata)
}

/// Replaces the file's `user.e2b.*` attributes with `metadata`.
pub fn replace(fd: BorrowedFd<'_>, metadata: &HashMap<String, String>) -> io::Result<()> {
    for name in list(|buf| {
        // SAFETY: the buffer pointer and length describe a live, writable buffer (or are
        // null/0 to ask for the size).
        unsafe { libc::flistxattr(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) }
    })? {
        if name.to_bytes().starts_with(XATTR_PREFIX.as_bytes()) {
            // SAFETY: `name` is a NUL-terminated attribute name.
            check(unsafe { libc::fremovexattr(fd.as_raw_fd(), name.as_ptr()) })?;
        }
    }
    for (key, value) in metadata {
        let name = CString::new(format!("{XATTR_PREFIX}{key}")).map_err(io::Error::other)?;
        // SAFETY: `name` is NUL-terminated and the value pointer/length describe a live slice.
        check(unsafe {
            libc::fsetxattr(
                fd.as_raw_fd(),
                name.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })?;
    }
    Ok(())
}

/// The `user.e2b.*` attributes of `path` (not following a final symlink); empty when the
/// filesystem has none or refuses to say.
pub fn read(path: &Path) -> HashMap<String, String> {
    let Ok(c_path) = CString::new(path.as_os_str().as_bytes()) else {
        return HashMap::new();
    };
    let Ok(names) = list(|buf| {
        // SAFETY: `c_path` is NUL-terminated; the buffer is live and writable (or null/0).
        unsafe { libc::llistxattr(c_path.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) }
    }) else {
        return HashMap::new();
    };
    let mut metadata = HashMap::new();
    for name in names {
        let Some(key) = name.to_bytes().strip_prefix(XATTR_PREFIX.as_bytes()) else {
            continue;
        };
        let mut value = vec![0u8; MAX_VALUE];
        // SAFETY: both names are NUL-terminated; the buffer is live and writable.
        let n = unsafe {
            libc::lgetxattr(
                c_path.as_ptr(),
                name.as_ptr(),
                value.as_mut_ptr().cast(),
                value.len(),
            )
        };
        if let Ok(n) = usize::try_from(n) {
            value.truncate(n);
            metadata.insert(
                String::from_utf8_lossy(key).into_owned(),
                String::from_utf8_lossy(&value).into_owned(),
            );
        }
    }
    metadata
}

/// Calls a `listxattr`-style function twice (size, then names) and splits the names.
fn list(mut call: impl FnMut(&mut [u8]) -> isize) -> io::Result<Vec<CString>> {
    let size = call(&mut []);
    let size = usize::try_from(size).map_err(|_| io::Error::last_os_error())?;
    if size == 0 {
        return Ok(Vec::new());
    }
    let mut buffer = vec![0u8; size];
    let got = usize::try_from(call(&mut buffer)).map_err(|_| io::Error::last_os_error())?;
    buffer.truncate(got);
    Ok(buffer
        .split_inclusive(|b| *b == 0)
        .filter_map(|name| CStr::from_bytes_with_nul(name).ok().map(CStr::to_owned))
        .collect())
}

fn check(result: libc::c_int) -> io::Result<()> {
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Whether an xattr error means the filesystem has no user attributes at all.
pub fn unsupported(error: &io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::ENOTSUP))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;
    use std::os::fd::AsFd;

    #[test]
    fn headers_become_lowercase_keys() {
        let mut headers = HeaderMap::new();
        headers.insert("X-Metadata-Owner", HeaderValue::from_static("Alice"));
        headers.insert("X-Other", HeaderValue::from_static("x"));
        let metadata = from_headers(&headers).unwrap();
        assert_eq!(metadata, HashMap::from([("owner".into(), "Alice".into())]));
        headers.insert("X-Metadata-Bad", HeaderValue::from_bytes(b"\xff").unwrap());
        assert!(from_headers(&headers).is_err());
    }

    #[test]
    fn replace_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let file = std::fs::File::create(&path).unwrap();
        let first = HashMap::from([("a".into(), "1".into()), ("b".into(), "2".into())]);
        match replace(file.as_fd(), &first) {
            Err(e) if unsupported(&e) => {
                panic!("the test directory's filesystem lacks user xattrs")
            }
            other => other.unwrap(),
        }
        assert_eq!(read(&path), first);
        let second = HashMap::from([("c".into(), "3".into())]);
        replace(file.as_fd(), &second).unwrap();
        assert_eq!(read(&path), second, "an upload replaces the whole set");
        replace(file.as_fd(), &HashMap::new()).unwrap();
        assert!(read(&path).is_empty());
    }
}
