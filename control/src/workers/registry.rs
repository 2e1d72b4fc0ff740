//! The workers connected to this control instance, with what they can take.
//!
//! Capacity in use is what the worker's last heartbeat said plus what control placed on it
//! since ([`Registry::reserve_best`] adds a reservation atomically with the choice, so two
//! concurrent creates cannot both take the last slot); the next heartbeat replaces the sum with
//! the worker's own figures. The worker enforces its limits itself and answers `no_capacity`
//! when control's view was stale, and placement then tries the next host.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use roost_proto::control::{Capacity, Hello, Usage};

use crate::placement::PlacementError;

/// Resources one sandbox takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Need {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub disk_mib: u64,
}

/// What a worker can take and has taken, as control sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Load {
    pub capacity: Capacity,
    pub usage: Usage,
    pub templates: BTreeSet<String>,
    /// An operator stopped new placements on the host; its sandboxes keep running.
    pub draining: bool,
}

impl Load {
    fn fits(&self, need: Need) -> bool {
        let (c, u) = (&self.capacity, &self.usage);
        u.sandboxes.saturating_add(1) <= c.max_sandboxes
            && u.vcpus.saturating_add(need.vcpus) <= c.vcpus
            && u.memory_mib.saturating_add(need.memory_mib) <= c.memory_mib
            && u.disk_mib.saturating_add(need.disk_mib) <= c.disk_mib
    }

    /// Ordering key: more free sandbox slots, then more free memory, is better.
    fn headroom(&self) -> (u32, u64) {
        (
            self.capacity
                .max_sandboxes
                .saturating_sub(self.usage.sandboxes),
            self.capacity
                .memory_mib
                .saturating_sub(self.usage.memory_mib),
        )
    }

    fn add(&mut self, need: Need) {
        let u = &mut self.usage;
        u.sandboxes = u.sandboxes.saturating_add(1);
        u.vcpus = u.vcpus.saturating_add(need.vcpus);
        u.memory_mib = u.memory_mib.saturating_add(need.memory_mib);
        u.disk_mib = u.disk_mib.saturating_add(need.disk_mib);
    }

    fn remove(&mut self, need: Need) {
        let u = &mut self.usage;
        u.sandboxes = u.sandboxes.saturating_sub(1);
        u.vcpus = u.vcpus.saturating_sub(need.vcpus);
        u.memory_mib = u.memory_mib.saturating_sub(need.memory_mib);
        u.disk_mib = u.disk_mib.saturating_sub(need.disk_mib);
    }
}

/// The host among `loads` with the most headroom that offers `template`, is not draining and
/// fits `need`, skipping `exclude`; ties go to the smaller id, so the choice is deterministic.
/// Hosts that offer the template but are draining count as offering it (so the answer is
/// "no capacity, retry", not "nobody has this template").
pub fn pick<'a>(
    loads: impl IntoIterator<Item = (&'a String, &'a Load)>,
    template: &str,
    need: Need,
    exclude: &[String],
) -> Result<&'a String, PlacementError> {
    let mut offering = loads
        .into_iter()
        .filter(|(id, l)| l.templates.contains(template) && !exclude.contains(id))
        .peekable();
    if offering.peek().is_none() {
        return Err(PlacementError::NoTemplateHost {
            template: template.to_owned(),
        });
    }
    offering
        .filter(|(_, l)| !l.draining && l.fits(need))
        .max_by(|(a_id, a), (b_id, b)| a.headroom().cmp(&b.headroom()).then_with(|| b_id.cmp(a_id)))
        .map(|(id, _)| id)
        .ok_or_else(|| PlacementError::NoCapacity {
            template: template.to_owned(),
        })
}

#[derive(Debug)]
struct Worker {
    connection: quinn::Connection,
    /// Which connection of the host this is; a late detach of an older one is ignored.
    epoch: u64,
    load: Load,
    /// Templates control saw the worker add (`true`: a snapshot it took) or remove, and when.
    recent: HashMap<String, (bool, Instant)>,
}

/// How long a template change control made on a worker (a snapshot taken, a template deleted)
/// outranks the worker's heartbeats. A heartbeat composed before the change can arrive after
/// it; without this, creates from a snapshot just taken were refused ("no connected worker
/// offers template") until the next heartbeat. A worker that really lost such a template
/// answers `unknown_template` to a create in the meantime.
const TEMPLATE_CHANGE_GRACE: Duration = Duration::from_secs(30);

/// The templates a worker offers: what its heartbeat lists, amended by the changes in `recent`
/// younger than [`TEMPLATE_CHANGE_GRACE`] (older ones are forgotten: the heartbeat decides).
fn reconcile(
    reported: &[String],
    recent: &mut HashMap<String, (bool, Instant)>,
    now: Instant,
) -> BTreeSet<String> {
    recent.retain(|_, (_, at)| now.saturating_duration_since(*at) < TEMPLATE_CHANGE_GRACE);
    let mut templates: BTreeSet<String> = reported.iter().cloned().collect();
    for (template, (offered, _)) in recent.iter() {
        if *offered {
            templates.insert(template.clone());
        } else {
            templates.remove(template);
        }
    }
    templates
}

/// A host chosen for a sandbox, with its reservation already counted.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub host_id: String,
    pub connection: quinn::Connection,
}

/// Connected workers by host id.
#[derive(Debug, Default)]
pub struct Registry {
    workers: Mutex<HashMap<String, Worker>>,
    next_epoch: AtomicU64,
    next_request: AtomicU64,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Worker>> {
        // Every critical section is a single map operation or a field update, so a panic
        // cannot leave the map inconsistent: a poisoned lock is still usable.
        self.workers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Records a worker's new connection; an older connection of the same host is closed.
    /// Returns the connection's epoch.
    pub fn attach(&self, host_id: &str, connection: quinn::Connection, hello: &Hello) -> u64 {
        let epoch = self.next_epoch.fetch_add(1, Ordering::Relaxed);
        let worker = Worker {
            connection,
            epoch,
            load: Load {
                capacity: hello.capacity,
                usage: hello.usage,
                templates: hello.templates.iter().cloned().collect(),
                draining: false,
            },
            recent: HashMap::new(),
        };
        if let Some(old) = self.lock().insert(host_id.to_owned(), worker) {
            old.connection.close(
                quinn::VarInt::from_u32(0),
                b"replaced by a newer connection",
            );
        }
        epoch
    }

    /// Forgets connection `epoch` of `host_id`, if it is still the current one.
    pub fn detach(&self, host_id: &str, epoch: u64) -> bool {
        let mut map = self.lock();
        if map.get(host_id).is_some_and(|w| w.epoch == epoch) {
            map.remove(host_id);
            true
        } else {
            false
        }
    }

    /// Forgets `host_id` whatever its connection, returning the connection to close.
    pub fn evict(&self, host_id: &str) -> Option<quinn::Connection> {
        self.lock().remove(host_id).map(|w| w.connection)
    }

    /// Applies a heartbeat's figures to connection `epoch` of `host_id`.
    pub fn report(&self, host_id: &str, epoch: u64, usage: Usage, templates: &[String]) {
        if let Some(w) = self.lock().get_mut(host_id).filter(|w| w.epoch == epoch) {
            w.load.usage = usage;
            w.load.templates = reconcile(templates, &mut w.recent, Instant::now());
        }
    }

    /// Marks `host_id` draining (no new placements) or not.
    pub fn set_draining(&self, host_id: &str, draining: bool) {
        if let Some(w) = self.lock().get_mut(host_id) {
            w.load.draining = draining;
        }
    }

    /// Records that `host_id` now offers `template` (a snapshot it just took); heartbeats
    /// decide again after [`TEMPLATE_CHANGE_GRACE`].
    pub fn offer(&self, host_id: &str, template: &str) {
        if let Some(w) = self.lock().get_mut(host_id) {
            w.load.templates.insert(template.to_owned());
            w.recent.insert(template.to_owned(), (true, Instant::now()));
        }
    }

    /// Records that `host_id` no longer offers `template` (deleted); heartbeats decide again
    /// after [`TEMPLATE_CHANGE_GRACE`].
    pub fn withdraw(&self, host_id: &str, template: &str) {
        if let Some(w) = self.lock().get_mut(host_id) {
            w.load.templates.remove(template);
            w.recent
                .insert(template.to_owned(), (false, Instant::now()));
        }
    }

    /// The connection of `host_id`, if it is connected.
    pub fn connection(&self, host_id: &str) -> Option<quinn::Connection> {
        self.lock().get(host_id).map(|w| w.connection.clone())
    }

    /// Ids of the connected hosts, sorted.
    pub fn connected(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.lock().keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Picks the connected host with the most headroom that offers `template` and fits
    /// `need`, skipping `exclude`, and reserves `need` on it.
    pub fn reserve_best(
        &self,
        template: &str,
        need: Need,
        exclude: &[String],
    ) -> Result<Candidate, PlacementError> {
        let mut map = self.lock();
        let host_id = pick(
            map.iter().map(|(id, w)| (id, &w.load)),
            template,
            need,
            exclude,
        )?
        .clone();
        // `pick` returned a key of this map, under the same lock.
        let Some(worker) = map.get_mut(&host_id) else {
            return Err(PlacementError::HostUnavailable { host: host_id });
        };
        worker.load.add(need);
        Ok(Candidate {
            host_id,
            connection: worker.connection.clone(),
        })
    }

    /// Gives back a reservation whose create failed.
    pub fn release(&self, host_id: &str, need: Need) {
        if let Some(w) = self.lock().get_mut(host_id) {
            w.load.remove(need);
        }
    }

    /// A fresh request id.
    pub fn next_request_id(&self) -> u64 {
        self.next_request.fetch_add(1, Ordering::Relaxed) + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(max_sandboxes: u32, used: u32, templates: &[&str]) -> Load {
        Load {
            capacity: Capacity {
                vcpus: 8,
                memory_mib: 8192,
                disk_mib: 100_000,
                max_sandboxes,
            },
            usage: Usage {
                sandboxes: used,
                vcpus: used,
                memory_mib: u64::from(used) * 512,
                disk_mib: u64::from(used) * 1024,
            },
            templates: templates.iter().map(|t| (*t).to_owned()).collect(),
            draining: false,
        }
    }

    const SMALL: Need = Need {
        vcpus: 1,
        memory_mib: 512,
        disk_mib: 1024,
    };

    fn hosts(list: &[(&str, Load)]) -> Vec<(String, Load)> {
        list.iter()
            .map(|(id, l)| ((*id).to_owned(), l.clone()))
            .collect()
    }

    fn choose(
        list: &[(String, Load)],
        template: &str,
        need: Need,
        exclude: &[String],
    ) -> Result<String, PlacementError> {
        pick(list.iter().map(|(id, l)| (id, l)), template, need, exclude).cloned()
    }

    #[test]
    fn prefers_the_host_with_most_headroom_and_breaks_ties_by_id() {
        let list = hosts(&[
            ("a", load(4, 3, &["base"])),
            ("b", load(4, 1, &["base"])),
            ("c", load(4, 1, &["base"])),
        ]);
        assert_eq!(choose(&list, "base", SMALL, &[]).unwrap(), "b");
        assert_eq!(choose(&list, "base", SMALL, &["b".into()]).unwrap(), "c");
    }

    #[test]
    fn only_hosts_offering_the_template_count() {
        let list = hosts(&[
            ("a", load(4, 0, &["base"])),
            ("b", load(4, 3, &["code-interpreter-v1"])),
        ]);
        assert_eq!(
            choose(&list, "code-interpreter-v1", SMALL, &[]).unwrap(),
            "b"
        );
        assert_eq!(
            choose(&list, "gpu", SMALL, &[]),
            Err(PlacementError::NoTemplateHost {
                template: "gpu".into()
            })
        );
        assert_eq!(
            choose(&list, "base", SMALL, &["a".into()]),
            Err(PlacementError::NoTemplateHost {
                template: "base".into()
            })
        );
    }

    #[test]
    fn draining_hosts_take_nothing_but_still_count_as_offering() {
        let mut drained = load(4, 0, &["base", "snap"]);
        drained.draining = true;
        let list = hosts(&[("a", drained), ("b", load(4, 3, &["base"]))]);
        assert_eq!(choose(&list, "base", SMALL, &[]).unwrap(), "b");
        assert_eq!(
            choose(&list, "snap", SMALL, &[]),
            Err(PlacementError::NoCapacity {
                template: "snap".into()
            })
        );
    }

    #[test]
    fn every_dimension_of_capacity_is_checked() {
        let full_slots = hosts(&[("a", load(2, 2, &["base"]))]);
        assert!(matches!(
            choose(&full_slots, "base", SMALL, &[]),
            Err(PlacementError::NoCapacity { .. })
        ));
        let roomy = hosts(&[("a", load(64, 0, &["base"]))]);
        for need in [
            Need { vcpus: 9, ..SMALL },
            Need {
                memory_mib: 8193,
                ..SMALL
            },
            Need {
                disk_mib: 100_001,
                ..SMALL
            },
        ] {
            assert!(
                matches!(
                    choose(&roomy, "base", need, &[]),
                    Err(PlacementError::NoCapacity { .. })
                ),
                "{need:?}"
            );
        }
        let exact = Need {
            vcpus: 8,
            memory_mib: 8192,
            disk_mib: 100_000,
        };
        assert_eq!(choose(&roomy, "base", exact, &[]).unwrap(), "a");
    }

    #[test]
    fn reservations_add_and_release_without_underflow() {
        let mut l = load(2, 0, &["base"]);
        l.add(SMALL);
        assert_eq!(l.usage.sandboxes, 1);
        assert!(l.fits(SMALL));
        l.add(SMALL);
        assert!(!l.fits(SMALL));
        l.remove(SMALL);
        l.remove(SMALL);
        l.remove(SMALL);
        assert_eq!(l.usage, Usage::default());
    }

    #[test]
    fn recent_template_changes_outrank_a_stale_heartbeat_for_a_while() {
        let start = Instant::now();
        let names = |set: &BTreeSet<String>| set.iter().cloned().collect::<Vec<_>>();
        let mut recent = HashMap::new();
        recent.insert("snap-new".to_owned(), (true, start));
        recent.insert("snap-gone".to_owned(), (false, start));
        // A heartbeat composed before the snapshot and the deletion.
        let stale = ["base".to_owned(), "snap-gone".to_owned()];
        let soon = start + Duration::from_secs(1);
        assert_eq!(
            names(&reconcile(&stale, &mut recent, soon)),
            ["base", "snap-new"]
        );
        // After the grace the worker's own list decides, and the changes are forgotten.
        let later = start + TEMPLATE_CHANGE_GRACE;
        assert_eq!(
            names(&reconcile(&stale, &mut recent, later)),
            ["base", "snap-gone"]
        );
        assert!(recent.is_empty());
    }
}
