//! `filesystem.Filesystem`: stat, list, create, move and remove entries as the calling user,
//! and watch directories (streamed or polled).

pub mod entry;
pub mod metadata;
mod service;
pub mod watch;

use std::sync::Arc;

use axum::Router;
use axum::routing::post;

use super::state::Envd;

/// The service's routes (`/filesystem.Filesystem/<Method>`).
pub fn routes() -> Router<Arc<Envd>> {
    Router::new()
        .route("/filesystem.Filesystem/Stat", post(service::stat))
        .route("/filesystem.Filesystem/MakeDir", post(service::make_dir))
        .route("/filesystem.Filesystem/Move", post(service::move_entry))
        .route("/filesystem.Filesystem/ListDir", post(service::list_dir))
        .route("/filesystem.Filesystem/Remove", post(service::remove))
        .route("/filesystem.Filesystem/WatchDir", post(service::watch_dir))
        .route(
            "/filesystem.Filesystem/CreateWatcher",
            post(service::create_watcher),
        )
        .route(
            "/filesystem.Filesystem/GetWatcherEvents",
            post(service::get_watcher_events),
        )
        .route(
            "/filesystem.Filesystem/RemoveWatcher",
            post(service::remove_watcher),
        )
}
