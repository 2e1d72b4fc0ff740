//! The entropy device on the event loop: activation and queue kicks.

use event_manager::{EventOps, Events, MutEventSubscriber};

use super::device::Rng;

impl MutEventSubscriber for Rng {
    fn init(&mut self, ops: &mut EventOps) {
        self.lifecycle.init(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if self.lifecycle.is_activate_event(fd) {
            if self.lifecycle.sync_registrations(ops) {
                // The driver may have queued requests before the eventfds were registered.
                self.process_queue();
            }
        } else if self.lifecycle.take_queue_event(fd).is_some() {
            self.process_queue();
        }
    }
}
