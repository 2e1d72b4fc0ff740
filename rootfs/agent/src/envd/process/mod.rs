//! `process.Process`: start commands (optionally on a PTY) as a user, stream their output,
//! reconnect to them, feed their input, signal and resize them.

mod fd_io;
mod lifecycle;
pub mod registry;
mod service;
mod spawn;

use std::sync::Arc;

use axum::Router;
use axum::routing::post;

use super::state::Envd;

/// The service's routes (`/process.Process/<Method>`).
pub fn routes() -> Router<Arc<Envd>> {
    Router::new()
        .route("/process.Process/Start", post(service::start))
        .route("/process.Process/Connect", post(service::connect_process))
        .route("/process.Process/List", post(service::list))
        .route("/process.Process/SendInput", post(service::send_input))
        .route("/process.Process/SendSignal", post(service::send_signal))
        .route("/process.Process/CloseStdin", post(service::close_stdin))
        .route("/process.Process/StreamInput", post(service::stream_input))
        .route("/process.Process/Update", post(service::update))
}
