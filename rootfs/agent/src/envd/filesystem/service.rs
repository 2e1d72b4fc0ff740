//! The `filesystem.Filesystem` Connect service. Every operation runs with the calling user's
//! filesystem credentials ([`crate::envd::fsuser`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::entry::{entry_info, from_metadata};
use super::watch;
use crate::envd::auth;
use crate::envd::connect::{self, ConnectError};
use crate::envd::fsuser::run_as;
use crate::envd::paths;
use crate::envd::proto::filesystem::{
    CreateWatcherRequest, CreateWatcherResponse, EntryInfo, GetWatcherEventsRequest,
    GetWatcherEventsResponse, ListDirRequest, ListDirResponse, MakeDirRequest, MakeDirResponse,
    MoveRequest, MoveResponse, RemoveRequest, RemoveResponse, RemoveWatcherRequest,
    RemoveWatcherResponse, StatRequest, StatResponse, WatchDirRequest, WatchDirResponse,
    watch_dir_response,
};
use crate::envd::state::Envd;
use crate::envd::users::Account;

/// Keepalive interval of `WatchDir` streams without a `Keepalive-Ping-Interval` header.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(50);

fn resolve(envd: &Envd, account: &Account, path: &str) -> Result<PathBuf, ConnectError> {
    paths::resolve(path, account, envd.config().default_workdir.as_deref())
}

pub async fn stat(State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Bytes) -> Response {
    let account = auth::request_account(&envd, &headers);
    connect::unary(&headers, &body, |request: StatRequest| async move {
        let account = account?;
        let path = resolve(&envd, &account, &request.path)?;
        let entry = run_as(&account, move || entry_info(&path)).await?;
        Ok(StatResponse { entry: Some(entry) })
    })
    .await
}

pub async fn make_dir(State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Bytes) -> Response {
    let account = auth::request_account(&envd, &headers);
    connect::unary(&headers, &body, |request: MakeDirRequest| async move {
        let account = account?;
        let path = resolve(&envd, &account, &request.path)?;
        let entry = run_as(&account, move || {
            if std::fs::symlink_metadata(&path).is_ok() {
                return Err(ConnectError::new(
                    connect::Code::AlreadyExists,
                    format!("{} already exists", path.display()),
                ));
            }
            std::fs::create_dir_all(&path)
                .map_err(|e| ConnectError::from_io(&format!("creating {}", path.display()), &e))?;
            entry_info(&path)
        })
        .await?;
        Ok(MakeDirResponse { entry: Some(entry) })
    })
    .await
}

pub async fn move_entry(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let account = auth::request_account(&envd, &headers);
    connect::unary(&headers, &body, |request: MoveRequest| async move {
        let account = account?;
        let source = resolve(&envd, &account, &request.source)?;
        let destination = resolve(&envd, &account, &request.destination)?;
        let entry = run_as(&account, move || {
            if let Some(parent) = destination.parent() {
                std::fs::create_dir_all(parent).map_err(|e| {
                    ConnectError::from_io(&format!("creating {}", parent.display()), &e)
                })?;
            }
            std::fs::rename(&source, &destination).map_err(|e| {
                ConnectError::from_io(
                    &format!("moving {} to {}", source.display(), destination.display()),
                    &e,
                )
            })?;
            entry_info(&destination)
        })
        .await?;
        Ok(MoveResponse { entry: Some(entry) })
    })
    .await
}

pub async fn list_dir(State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Bytes) -> Response {
    let account = auth::request_account(&envd, &headers);
    connect::unary(&headers, &body, |request: ListDirRequest| async move {
        let account = account?;
        let path = resolve(&envd, &account, &request.path)?;
        let depth = request.depth.max(1);
        let entries = run_as(&account, move || {
            let metadata = std::fs::metadata(&path)
                .map_err(|e| ConnectError::from_io(&path.display().to_string(), &e))?;
            if !metadata.is_dir() {
                return Err(ConnectError::invalid(format!(
                    "{} is not a directory",
                    path.display()
                )));
            }
            let mut entries = Vec::new();
            walk(&path, depth, &mut entries)?;
            Ok(entries)
        })
        .await?;
        Ok(ListDirResponse { entries })
    })
    .await
}

/// Lists `dir` and, below `depth` 1, its subdirectories (symlinks are not followed).
fn walk(dir: &Path, depth: u32, out: &mut Vec<EntryInfo>) -> Result<(), ConnectError> {
    let read = std::fs::read_dir(dir)
        .map_err(|e| ConnectError::from_io(&format!("listing {}", dir.display()), &e))?;
    let mut children: Vec<_> = read.flatten().map(|e| e.path()).collect();
    children.sort();
    for child in children {
        let Ok(metadata) = std::fs::symlink_metadata(&child) else {
            continue; // vanished meanwhile
        };
        out.push(from_metadata(&child, &metadata));
        if depth > 1 && metadata.is_dir() {
            // A subdirectory the user cannot read is listed but not entered.
            let _ = walk(&child, depth - 1, out);
        }
    }
    Ok(())
}

pub async fn remove(State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Bytes) -> Response {
    let account = auth::request_account(&envd, &headers);
    connect::unary(&headers, &body, |request: RemoveRequest| async move {
        let account = account?;
        let path = resolve(&envd, &account, &request.path)?;
        run_as(&account, move || {
            let metadata = std::fs::symlink_metadata(&path)
                .map_err(|e| ConnectError::from_io(&path.display().to_string(), &e))?;
            let result = if metadata.is_dir() {
                std::fs::remove_dir_all(&path)
            } else {
                std::fs::remove_file(&path)
            };
            result.map_err(|e| ConnectError::from_io(&format!("removing {}", path.display()), &e))
        })
        .await?;
        Ok(RemoveResponse {})
    })
    .await
}

/// Checks, as the user, that `path` is a directory they may read.
async fn watchable(account: &Account, path: PathBuf) -> Result<PathBuf, ConnectError> {
    run_as(account, move || {
        let metadata = std::fs::metadata(&path)
            .map_err(|e| ConnectError::from_io(&path.display().to_string(), &e))?;
        if !metadata.is_dir() {
            return Err(ConnectError::invalid(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        std::fs::read_dir(&path)
            .map_err(|e| ConnectError::from_io(&format!("watching {}", path.display()), &e))?;
        Ok(path)
    })
    .await
}

pub async fn watch_dir(State(envd): State<Arc<Envd>>, headers: HeaderMap, body: Bytes) -> Response {
    let request: WatchDirRequest = match connect::stream_request(&headers, &body) {
        Ok(request) => request,
        Err(response) => return *response,
    };
    let started = async {
        let account = auth::request_account(&envd, &headers)?;
        let path = watchable(&account, resolve(&envd, &account, &request.path)?).await?;
        watch::watch(path, request.recursive, request.include_entry)
    };
    let mut events = match started.await {
        Ok(events) => events,
        Err(e) => return connect::stream_error(e),
    };
    let keepalive = headers
        .get("keepalive-ping-interval")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&s| s > 0)
        .map_or(DEFAULT_KEEPALIVE, Duration::from_secs);
    let (sender, response) = connect::stream_reply();
    tokio::spawn(async move {
        let message = |event| WatchDirResponse { event: Some(event) };
        if !sender
            .send(&message(watch_dir_response::Event::Start(
                watch_dir_response::StartEvent {},
            )))
            .await
        {
            return;
        }
        let mut ticker =
            tokio::time::interval_at(tokio::time::Instant::now() + keepalive, keepalive);
        loop {
            let next = tokio::select! {
                event = events.recv() => match event {
                    Some(event) => message(watch_dir_response::Event::Filesystem(event)),
                    None => break,
                },
                _ = ticker.tick() => message(watch_dir_response::Event::Keepalive(watch_dir_response::KeepAlive {})),
                () = sender.closed() => return,
            };
            if !sender.send(&next).await {
                return;
            }
        }
        sender.finish(Ok(())).await;
    });
    response
}

pub async fn create_watcher(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let account = auth::request_account(&envd, &headers);
    connect::unary(
        &headers,
        &body,
        |request: CreateWatcherRequest| async move {
            let account = account?;
            let path = watchable(&account, resolve(&envd, &account, &request.path)?).await?;
            let events = watch::watch(path, request.recursive, request.include_entry)?;
            Ok(CreateWatcherResponse {
                watcher_id: envd.watchers.create(events),
            })
        },
    )
    .await
}

pub async fn get_watcher_events(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    connect::unary(
        &headers,
        &body,
        |request: GetWatcherEventsRequest| async move {
            Ok(GetWatcherEventsResponse {
                events: envd.watchers.take_events(&request.watcher_id)?,
            })
        },
    )
    .await
}

pub async fn remove_watcher(
    State(envd): State<Arc<Envd>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    connect::unary(
        &headers,
        &body,
        |request: RemoveWatcherRequest| async move {
            envd.watchers.remove(&request.watcher_id)?;
            Ok(RemoveWatcherResponse {})
        },
    )
    .await
}
