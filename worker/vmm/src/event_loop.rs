//! The device event loop: one thread running an event-manager epoll loop for every virtio
//! device (queue kicks, vsock sockets, activation), plus a stop eventfd so the VM can end it
//! and a park eventfd so a snapshot can hold every device still ([`DevicePause`]).
//!
//! Why park the thread rather than lock each device: a snapshot saves device state and guest
//! memory one after the other; a device serving a host vsock packet in between would change
//! queue positions and memory inconsistently. Parked inside its own handler, the thread touches
//! nothing until resumed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use seccompiler::BpfProgram;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::exit::{ExitCoordinator, PanicGuard, VmExit};

/// A device as the event loop sees it.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Why the event loop could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EventLoopError {
    #[error("could not create the device event loop")]
    Create(#[source] event_manager::Error),
    #[error("could not create the event loop's stop eventfd")]
    StopFd(#[source] std::io::Error),
    #[error("could not spawn the device thread")]
    Spawn(#[source] std::io::Error),
    #[error("could not signal the device thread to park")]
    ParkSignal(#[source] std::io::Error),
    #[error("the device thread did not park within {0:?}")]
    ParkTimeout(Duration),
}

#[derive(Debug, Default)]
struct ParkFlags {
    /// The controller wants the thread parked.
    requested: bool,
    /// The thread is parked.
    parked: bool,
}

#[derive(Debug, Default)]
struct ParkShared {
    flags: Mutex<ParkFlags>,
    changed: Condvar,
}

impl ParkShared {
    fn flags(&self) -> std::sync::MutexGuard<'_, ParkFlags> {
        self.flags.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Parks the device thread inside its handler while a pause is requested.
struct Parker {
    evt: EventFd,
    shared: Arc<ParkShared>,
}

impl MutEventSubscriber for Parker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let mut flags = self.shared.flags();
        if !flags.requested {
            return;
        }
        flags.parked = true;
        self.shared.changed.notify_all();
        while flags.requested {
            flags = self
                .shared
                .changed
                .wait(flags)
                .unwrap_or_else(|p| p.into_inner());
        }
        flags.parked = false;
        self.shared.changed.notify_all();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!(error = ?e, "could not watch the event loop's park eventfd");
        }
    }
}

/// Parks and resumes the device thread from another thread (the API / snapshot thread).
#[derive(Debug, Clone)]
pub struct DevicePause {
    evt: Arc<EventFd>,
    shared: Arc<ParkShared>,
}

impl DevicePause {
    /// Parks the device thread; returns once it is parked (no device runs until [`resume`]).
    ///
    /// [`resume`]: DevicePause::resume
    pub fn pause(&self, timeout: Duration) -> Result<(), EventLoopError> {
        let deadline = Instant::now() + timeout;
        let mut flags = self.shared.flags();
        flags.requested = true;
        self.evt.write(1).map_err(EventLoopError::ParkSignal)?;
        while !flags.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                flags.requested = false;
                self.shared.changed.notify_all();
                return Err(EventLoopError::ParkTimeout(timeout));
            }
            flags = self
                .shared
                .changed
                .wait_timeout(flags, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Lets a parked device thread go on (a no-op when it is not parked).
    pub fn resume(&self) {
        self.shared.flags().requested = false;
        self.shared.changed.notify_all();
    }
}

/// Ends the loop when its eventfd is written.
struct Stopper {
    evt: EventFd,
    stopped: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.stopped.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!(error = ?e, "could not watch the event loop's stop eventfd");
        }
    }
}

/// The loop before it runs: devices are added while the VM is built.
pub struct EventLoop {
    manager: EventManager<Subscriber>,
    stop_evt: EventFd,
    stopped: Arc<AtomicBool>,
    pause: DevicePause,
}

impl std::fmt::Debug for RunningEventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunningEventLoop").finish_non_exhaustive()
    }
}

impl std::fmt::Debug for EventLoop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventLoop").finish_non_exhaustive()
    }
}

impl EventLoop {
    pub fn new() -> Result<Self, EventLoopError> {
        let mut manager = EventManager::<Subscriber>::new().map_err(EventLoopError::Create)?;
        let stop_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::StopFd)?;
        let stopped = Arc::new(AtomicBool::new(false));
        let stopper = Stopper {
            evt: stop_evt.try_clone().map_err(EventLoopError::StopFd)?,
            stopped: stopped.clone(),
        };
        manager.add_subscriber(Arc::new(Mutex::new(stopper)));
        let park_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(EventLoopError::StopFd)?;
        let pause = DevicePause {
            evt: Arc::new(park_evt.try_clone().map_err(EventLoopError::StopFd)?),
            shared: Arc::new(ParkShared::default()),
        };
        manager.add_subscriber(Arc::new(Mutex::new(Parker {
            evt: park_evt,
            shared: pause.shared.clone(),
        })));
        Ok(Self {
            manager,
            stop_evt,
            stopped,
            pause,
        })
    }

    /// Adds a device; its `init` runs now (registers its first fds).
    pub fn add(&mut self, subscriber: Subscriber) {
        self.manager.add_subscriber(subscriber);
    }

    /// Starts the device thread; it installs `seccomp` first.
    pub fn spawn(
        self,
        seccomp: Option<BpfProgram>,
        exits: Arc<ExitCoordinator>,
    ) -> Result<RunningEventLoop, EventLoopError> {
        let Self {
            mut manager,
            stop_evt,
            stopped,
            pause,
        } = self;
        let thread_stopped = stopped.clone();
        let thread = std::thread::Builder::new()
            .name("devices".into())
            .spawn(move || {
                let _guard = PanicGuard::new(exits.clone(), "devices");
                if let Err(e) = crate::seccomp::install(seccomp.as_ref()) {
                    exits.request(VmExit::Error {
                        detail: format!("device thread: {e}"),
                    });
                    return manager;
                }
                while !thread_stopped.load(Ordering::SeqCst) {
                    if let Err(e) = manager.run() {
                        exits.request(VmExit::Error {
                            detail: format!("device event loop failed: {e}"),
                        });
                        break;
                    }
                }
                // Handed back so the devices are dropped on the joining thread: their clean-up
                // (closing files, unlinking the vsock socket) is outside this thread's filter.
                manager
            })
            .map_err(EventLoopError::Spawn)?;
        Ok(RunningEventLoop {
            thread: Some(thread),
            stop_evt,
            stopped,
            pause,
        })
    }
}

/// The running device thread.
pub struct RunningEventLoop {
    thread: Option<JoinHandle<EventManager<Subscriber>>>,
    stop_evt: EventFd,
    stopped: Arc<AtomicBool>,
    pause: DevicePause,
}

impl RunningEventLoop {
    /// Parks and resumes the device thread.
    pub fn pauser(&self) -> DevicePause {
        self.pause.clone()
    }

    /// Stops the loop, joins its thread and drops every device it owned on this thread.
    pub fn stop(&mut self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.pause.resume();
        let _ = self.stop_evt.write(1);
        if let Some(thread) = self.thread.take() {
            match thread.join() {
                Ok(manager) => drop(manager),
                Err(_) => tracing::error!("the device thread panicked"),
            }
        }
    }
}

impl Drop for RunningEventLoop {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Counter {
        evt: EventFd,
        seen: Arc<AtomicUsize>,
    }

    impl MutEventSubscriber for Counter {
        fn process(&mut self, _events: Events, _ops: &mut EventOps) {
            let _ = self.evt.read();
            self.seen.fetch_add(1, Ordering::SeqCst);
        }
        fn init(&mut self, ops: &mut EventOps) {
            ops.add(Events::new(&self.evt, EventSet::IN)).unwrap();
        }
    }

    #[test]
    fn runs_devices_and_stops_on_request() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let mut event_loop = EventLoop::new().unwrap();
        event_loop.add(Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        })));
        let mut running = event_loop
            .spawn(None, Arc::new(ExitCoordinator::new()))
            .unwrap();
        evt.write(1).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while seen.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        running.stop();
        assert!(running.thread.is_none());
    }

    #[test]
    fn a_parked_loop_serves_nothing_until_resumed_and_still_stops() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let seen = Arc::new(AtomicUsize::new(0));
        let mut event_loop = EventLoop::new().unwrap();
        event_loop.add(Arc::new(Mutex::new(Counter {
            evt: evt.try_clone().unwrap(),
            seen: seen.clone(),
        })));
        let mut running = event_loop
            .spawn(None, Arc::new(ExitCoordinator::new()))
            .unwrap();
        let pause = running.pauser();
        pause.pause(Duration::from_secs(10)).unwrap();
        evt.write(1).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(seen.load(Ordering::SeqCst), 0, "parked: nothing served");
        pause.resume();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(seen.load(Ordering::SeqCst), 1, "served after resume");
        pause.pause(Duration::from_secs(10)).unwrap();
        running.stop();
        assert!(running.thread.is_none(), "stop releases a parked loop");
    }
}
