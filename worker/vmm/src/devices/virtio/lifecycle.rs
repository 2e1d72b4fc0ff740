//! Activation and reset bookkeeping shared by every device, following Firecracker's pattern:
//! the transport activates a device on a vCPU thread, the device stores its queues and signals
//! its activate eventfd, and the event-loop thread then (un)registers the queue eventfds with
//! epoll. Only the event-loop thread touches epoll, so no locking beyond the device mutex.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use event_manager::{EventOps, EventSet, Events};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::device::{ActivateError, Activation};
use super::persist::QueueSnapshot;
use super::ratelimit::guest_warn;

/// Activation state of one device plus its epoll registrations.
#[derive(Debug)]
pub struct DeviceLifecycle {
    activate_evt: EventFd,
    active: Option<Activation>,
    /// Whether `active`'s queue eventfds are registered with the event loop.
    registered: bool,
    /// Queue eventfds of a reset device still registered with the event loop; kept open until
    /// removed, because removal needs the fd.
    stale: Vec<EventFd>,
}

impl DeviceLifecycle {
    /// A device that is not active yet.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            activate_evt: EventFd::new(EFD_NONBLOCK)?,
            active: None,
            registered: false,
            stale: Vec::new(),
        })
    }

    /// Registers the activate eventfd (from `MutEventSubscriber::init`).
    pub fn init(&self, ops: &mut EventOps) {
        if let Err(err) = ops.add(Events::new(&self.activate_evt, EventSet::IN)) {
            tracing::error!(%err, "cannot register a virtio activate eventfd");
        }
    }

    /// Stores the queues and wakes the event loop to register them.
    pub fn activate(
        &mut self,
        activation: Activation,
        queue_count: usize,
    ) -> Result<(), ActivateError> {
        if self.active.is_some() {
            return Err(ActivateError::AlreadyActive);
        }
        if activation.queues.len() != queue_count || activation.queue_evts.len() != queue_count {
            return Err(ActivateError::QueueCount {
                expected: queue_count,
                got: activation.queues.len().min(activation.queue_evts.len()),
            });
        }
        self.active = Some(activation);
        self.registered = false;
        self.activate_evt.write(1).map_err(ActivateError::Signal)
    }

    /// Drops the queues and wakes the event loop to unregister their eventfds.
    pub fn reset(&mut self) {
        if let Some(active) = self.active.take()
            && self.registered
        {
            self.stale.extend(active.queue_evts);
        }
        self.registered = false;
        // Always wake the event loop: devices drop their own registrations there too.
        if let Err(err) = self.activate_evt.write(1) {
            tracing::error!(%err, "cannot signal a virtio device reset to the event loop");
        }
    }

    /// True when `fd` is the activate eventfd.
    pub fn is_activate_event(&self, fd: RawFd) -> bool {
        fd == self.activate_evt.as_raw_fd()
    }

    /// Handles a wake-up of the activate eventfd: unregisters stale queue eventfds, registers
    /// the active ones. Returns true when the device was just registered (and may have work).
    pub fn sync_registrations(&mut self, ops: &mut EventOps) -> bool {
        // The counter value is irrelevant; reading only re-arms the eventfd. EAGAIN means a
        // spurious wake-up.
        let _ = self.activate_evt.read();
        for evt in self.stale.drain(..) {
            if let Err(err) = ops.remove(Events::empty(&evt)) {
                tracing::warn!(%err, "cannot unregister a stale virtio queue eventfd");
            }
        }
        let Some(active) = &self.active else {
            return false;
        };
        if self.registered {
            return false;
        }
        for evt in &active.queue_evts {
            if let Err(err) = ops.add(Events::new(evt, EventSet::IN)) {
                guest_warn!(%err, "cannot register a virtio queue eventfd");
            }
        }
        self.registered = true;
        true
    }

    /// The index of the queue whose eventfd is `fd`; reads (re-arms) that eventfd.
    pub fn take_queue_event(&self, fd: RawFd) -> Option<usize> {
        let active = self.active.as_ref()?;
        let index = active
            .queue_evts
            .iter()
            .position(|evt| evt.as_raw_fd() == fd)?;
        // EAGAIN only means another wake-up already consumed the count.
        let _ = active.queue_evts[index].read();
        Some(index)
    }

    /// The running device's queues and memory, if active.
    pub fn active(&self) -> Option<&Activation> {
        self.active.as_ref()
    }

    /// Mutable access to the running device's queues, if active.
    pub fn active_mut(&mut self) -> Option<&mut Activation> {
        self.active.as_mut()
    }

    /// Positions of the running queues (empty when not active).
    pub fn queue_snapshots(&self) -> Vec<QueueSnapshot> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(QueueSnapshot::from).collect())
            .unwrap_or_default()
    }

    /// Whether the device is active.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }
}
