//! The vsock device on the event loop: activation, queue kicks and host socket events. After
//! every event the rx queue is refilled and epoll interest brought up to date.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::{TXQ, Vsock};

impl MutEventSubscriber for Vsock {
    fn init(&mut self, ops: &mut EventOps) {
        self.lifecycle.init(ops);
        self.muxer.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.lifecycle.is_activate_event(fd) {
            if self.lifecycle.sync_registrations(ops) {
                self.process_tx();
            }
        } else if let Some(queue) = self.lifecycle.take_queue_event(fd) {
            // An rx kick means new buffers (served below); the event queue is never used.
            if queue == TXQ {
                self.process_tx();
            }
        } else if !self.muxer.handle_event(fd, events.event_set()) {
            tracing::warn!(fd, "vsock: event for an unknown fd");
            // Drop it so a stale registration cannot spin the loop.
            let _ = ops.remove(events);
        }
        self.process_rx();
        self.muxer.sync_epoll(ops);
    }
}
