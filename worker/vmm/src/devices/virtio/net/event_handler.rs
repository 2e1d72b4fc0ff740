//! The network device on the event loop: activation, queue kicks and the tap.
//!
//! The tap is registered edge-triggered: `process_rx` reads it until it is empty or the guest
//! has no buffer left; in the second case the next rx kick resumes reading, so a full guest
//! never makes the loop spin on a readable tap.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::device::{Net, RXQ, TXQ};

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        self.lifecycle.init(ops);
        if let Err(err) = ops.add(Events::new(
            &self.tap,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )) {
            tracing::error!(%err, "virtio-net: cannot register the tap with the event loop");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.lifecycle.is_activate_event(fd) {
            if self.lifecycle.sync_registrations(ops) {
                self.process_tx();
                self.process_rx();
            }
        } else if let Some(queue) = self.lifecycle.take_queue_event(fd) {
            match queue {
                RXQ => self.process_rx(),
                TXQ => self.process_tx(),
                _ => {}
            }
        } else if fd == self.tap.as_raw_fd() {
            self.process_rx();
        } else {
            tracing::warn!(fd, "virtio-net: event for an unknown fd");
            let _ = ops.remove(events);
        }
    }
}
