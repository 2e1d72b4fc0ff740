//! Reading and writing guest files as streams of chunks, never whole files in memory.
//!
//! Paths must be absolute. Writes go to the path itself (created, or truncated): a write whose
//! connection drops before `End` leaves a partial file and gets no `Done`, so the client knows.

use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bytes::BytesMut;
use futures::{SinkExt, StreamExt};
use nix::unistd::{Gid, Uid, chown};
use roost_proto::agent::{
    AgentMessage, ClientMessage, ErrorKind, ErrorReply, Frame, MAX_CHUNK_LEN, ReadFileRequest,
    StreamKind, UserSpec, WriteFileRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::connection::{Conn, frame_error, io_error, send};

/// Mode of a file created without an explicit one.
const DEFAULT_FILE_MODE: u32 = 0o644;
/// Mode of directories created for a write.
const DIR_MODE: u32 = 0o755;

pub async fn read(request: ReadFileRequest, conn: &mut Conn) -> Result<(), ErrorReply> {
    let path = absolute(&request.path)?;
    let mut file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| io_error(&format!("cannot open {}", path.display()), &e))?;
    let meta = file
        .metadata()
        .await
        .map_err(|e| io_error(&format!("cannot stat {}", path.display()), &e))?;
    if meta.is_dir() {
        return Err(ErrorReply::new(
            ErrorKind::IsADirectory,
            format!("{} is a directory", path.display()),
        ));
    }
    send(
        conn,
        AgentMessage::FileInfo {
            size: meta.len(),
            mode: meta.mode() & 0o7777,
        },
    )
    .await?;
    let mut sent: u64 = 0;
    let mut buf = BytesMut::new();
    loop {
        buf.reserve(MAX_CHUNK_LEN);
        let mut limited = (&mut file).take(u64::try_from(MAX_CHUNK_LEN).unwrap_or(u64::MAX));
        let n = limited
            .read_buf(&mut buf)
            .await
            .map_err(|e| io_error(&format!("cannot read {}", path.display()), &e))?;
        if n == 0 {
            break;
        }
        sent += u64::try_from(n).unwrap_or(u64::MAX);
        conn.send(Frame::<AgentMessage>::Data(
            StreamKind::File,
            buf.split().freeze(),
        ))
        .await
        .map_err(|e| ErrorReply::new(ErrorKind::Io, format!("sending to the client: {e}")))?;
    }
    send(conn, AgentMessage::Done { bytes: sent }).await
}

pub async fn write(request: WriteFileRequest, conn: &mut Conn) -> Result<(), ErrorReply> {
    let path = absolute(&request.path)?;
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| ErrorReply::new(ErrorKind::BadRequest, "cannot write to /"))?;
    if request.create_dirs {
        create_dirs(parent, request.owner)?;
    } else {
        check_parent(parent)?;
    }
    let mode = request.mode.unwrap_or(DEFAULT_FILE_MODE);
    if mode > 0o7777 {
        return Err(ErrorReply::new(
            ErrorKind::BadRequest,
            format!("mode {mode:o} has bits beyond 07777"),
        ));
    }
    // On the blocking pool: opening a FIFO for writing blocks until it has a reader, and that
    // must not stall the channel's runtime.
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&path)
        .await
        .map_err(|e| io_error(&format!("cannot create {}", path.display()), &e))?;
    if request.mode.is_some() {
        // An existing file keeps its mode on open; creation is subject to the umask.
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .await
            .map_err(|e| io_error(&format!("cannot chmod {}", path.display()), &e))?;
    }
    if let Some(owner) = request.owner {
        set_owner(&path, owner)?;
    }
    send(conn, AgentMessage::Accepted).await?;
    let mut written: u64 = 0;
    loop {
        match conn.next().await {
            None => {
                return Err(ErrorReply::new(
                    ErrorKind::Io,
                    "the client closed the connection before `end`",
                ));
            }
            Some(Err(e)) => return Err(frame_error(&e)),
            Some(Ok(Frame::Data(StreamKind::File, bytes))) => {
                file.write_all(&bytes)
                    .await
                    .map_err(|e| io_error(&format!("cannot write {}", path.display()), &e))?;
                written += u64::try_from(bytes.len()).unwrap_or(u64::MAX);
            }
            Some(Ok(Frame::Message(ClientMessage::End))) => break,
            Some(Ok(other)) => {
                return Err(ErrorReply::new(
                    ErrorKind::BadRequest,
                    format!("{other:?} is not valid while writing a file"),
                ));
            }
        }
    }
    file.flush()
        .await
        .map_err(|e| io_error(&format!("cannot write {}", path.display()), &e))?;
    send(conn, AgentMessage::Done { bytes: written }).await
}

fn absolute(path: &str) -> Result<PathBuf, ErrorReply> {
    let path = Path::new(path);
    if path.is_absolute() {
        Ok(path.to_owned())
    } else {
        Err(ErrorReply::new(
            ErrorKind::BadRequest,
            format!("{:?} is not an absolute path", path.display().to_string()),
        ))
    }
}

fn check_parent(parent: &Path) -> Result<(), ErrorReply> {
    match std::fs::metadata(parent) {
        Ok(meta) if meta.is_dir() => Ok(()),
        Ok(_) => Err(ErrorReply::new(
            ErrorKind::NotADirectory,
            format!("{} is not a directory", parent.display()),
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(ErrorReply::new(
            ErrorKind::NotFound,
            format!(
                "directory {} does not exist (ask for create_dirs to create it)",
                parent.display()
            ),
        )),
        Err(e) => Err(io_error(&format!("cannot stat {}", parent.display()), &e)),
    }
}

/// Creates `dir` and its missing ancestors; those created get `owner` when given.
fn create_dirs(dir: &Path, owner: Option<UserSpec>) -> Result<(), ErrorReply> {
    let missing: Vec<&Path> = dir
        .ancestors()
        .take_while(|d| std::fs::symlink_metadata(d).is_err())
        .collect();
    for d in missing.into_iter().rev() {
        std::fs::DirBuilder::new()
            .mode(DIR_MODE)
            .create(d)
            .or_else(|e| {
                // Someone else created it meanwhile.
                if e.kind() == std::io::ErrorKind::AlreadyExists && d.is_dir() {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .map_err(|e| io_error(&format!("cannot create directory {}", d.display()), &e))?;
        if let Some(owner) = owner {
            set_owner(d, owner)?;
        }
    }
    check_parent(dir)
}

fn set_owner(path: &Path, owner: UserSpec) -> Result<(), ErrorReply> {
    chown(
        path,
        Some(Uid::from_raw(owner.uid)),
        Some(Gid::from_raw(owner.gid)),
    )
    .map_err(|e| {
        io_error(
            &format!("cannot chown {}", path.display()),
            &std::io::Error::from(e),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_paths_are_refused() {
        assert_eq!(
            absolute("etc/passwd").unwrap_err().kind,
            ErrorKind::BadRequest
        );
        assert_eq!(absolute("").unwrap_err().kind, ErrorKind::BadRequest);
        assert!(absolute("/etc/passwd").is_ok());
    }

    #[test]
    fn missing_parent_is_not_found_and_create_dirs_makes_it() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/c");
        let error = check_parent(&dir).unwrap_err();
        assert_eq!(error.kind, ErrorKind::NotFound);
        assert!(error.message.contains("create_dirs"), "{error}");
        create_dirs(&dir, None).unwrap();
        assert!(dir.is_dir());
        assert_eq!(
            std::fs::metadata(tmp.path().join("a")).unwrap().mode() & 0o777,
            DIR_MODE
        );
        let file = tmp.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        assert_eq!(
            create_dirs(&file.join("sub"), None).unwrap_err().kind,
            ErrorKind::NotADirectory
        );
    }
}
