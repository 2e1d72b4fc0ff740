//! The manager's bookkeeping over an in-memory backend: its "VMs" make and remove their
//! runtime directories and write snapshot directories as the real VMM does, and record every
//! call, so states, files, identities, snapshot parents and errors are checked without KVM.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};

use super::*;
use crate::vm_handle::SnapshotInfo;

#[derive(Debug, Clone, PartialEq, Eq)]
struct SnapshotCall {
    dir: PathBuf,
    kind: SnapshotKind,
    parent: Option<PathBuf>,
    resume: bool,
}

#[derive(Debug, Default)]
struct Log {
    restores: Vec<(PathBuf, IdentityRequest)>,
    egress: Vec<EgressPolicy>,
    snapshots: Vec<SnapshotCall>,
    resumes: usize,
    destroyed: usize,
}

#[derive(Debug, Default, Clone)]
struct Fake {
    log: Arc<Mutex<Log>>,
    fail_restore: Arc<AtomicBool>,
    fail_snapshot: Arc<AtomicBool>,
}

impl Fake {
    fn log(&self) -> MutexGuard<'_, Log> {
        self.log.lock().unwrap()
    }
}

#[derive(Debug)]
struct FakeVm {
    dir: PathBuf,
    fake: Fake,
}

impl VmBackend for Fake {
    type Vm = FakeVm;

    async fn restore(
        &self,
        snapshot_dir: &Path,
        runtime_dir: &Path,
        identity: &IdentityRequest,
        egress: &EgressPolicy,
    ) -> Result<FakeVm, VmFailure> {
        self.log().egress.push(egress.clone());
        assert!(
            snapshot_dir.join(SNAPSHOT_STATE_FILE).is_file(),
            "restoring from a real snapshot: {}",
            snapshot_dir.display()
        );
        self.log()
            .restores
            .push((snapshot_dir.to_owned(), identity.clone()));
        if self.fail_restore.load(Ordering::SeqCst) {
            return Err("the VMM exited before the agent was ready: bad snapshot".into());
        }
        std::fs::create_dir(runtime_dir)?;
        std::fs::write(runtime_dir.join("vsock.sock"), b"")?;
        Ok(FakeVm {
            dir: runtime_dir.to_owned(),
            fake: self.clone(),
        })
    }
}

/// Depth past which the fake's disk chains merge (the VMM's is 4).
const FAKE_MAX_DEPTH: usize = 3;
/// Where a fake snapshot records its disk chain, one absolute path per line.
const FAKE_CHAIN_FILE: &str = "disk-chain.txt";

/// The disk chain a snapshot into `dir` has, as the VMM builds it: a full snapshot has its
/// own layer only; a diff adds its layer to its parent's chain (a template's is its own
/// layer), and a chain deeper than [`FAKE_MAX_DEPTH`] merges into the new layer.
fn fake_disk_chain(
    dir: &Path,
    kind: SnapshotKind,
    parent: Option<&Path>,
) -> std::io::Result<Vec<PathBuf>> {
    let own = dir.join("disk0.layer");
    std::fs::write(&own, b"layer")?;
    let mut chain = match (kind, parent) {
        (SnapshotKind::Diff, Some(parent)) => {
            match std::fs::read_to_string(parent.join(FAKE_CHAIN_FILE)) {
                Ok(text) => text.lines().map(PathBuf::from).collect(),
                Err(_) => vec![parent.join("disk0.layer")],
            }
        }
        _ => Vec::new(),
    };
    chain.push(own.clone());
    if chain.len() > FAKE_MAX_DEPTH {
        chain = vec![own];
    }
    let text: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
    std::fs::write(dir.join(FAKE_CHAIN_FILE), text.join("\n"))?;
    Ok(chain)
}

impl SandboxVm for FakeVm {
    async fn snapshot(
        &self,
        dir: &Path,
        kind: SnapshotKind,
        parent: Option<&Path>,
        resume: bool,
    ) -> Result<SnapshotInfo, VmFailure> {
        self.fake.log().snapshots.push(SnapshotCall {
            dir: dir.to_owned(),
            kind,
            parent: parent.map(Path::to_owned),
            resume,
        });
        std::fs::create_dir(dir)?;
        std::fs::write(dir.join("memory.hdr"), b"partial")?;
        if self.fake.fail_snapshot.load(Ordering::SeqCst) {
            return Err("the VMM refused: no space left on device".into());
        }
        std::fs::write(dir.join(SNAPSHOT_STATE_FILE), b"state")?;
        let disk_chain = fake_disk_chain(dir, kind, parent)?;
        Ok(SnapshotInfo {
            dir: dir.to_owned(),
            kind,
            memory_pages_written: 3,
            memory_depth: 1,
            paused_ms: 1,
            state_bytes: 5,
            disk_chain: Some(disk_chain),
        })
    }

    async fn resume(&self) -> Result<(), VmFailure> {
        self.fake.log().resumes += 1;
        Ok(())
    }

    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn runtime_dir(&self) -> &Path {
        &self.dir
    }

    async fn destroy(self: Arc<Self>) {
        std::fs::remove_dir_all(&self.dir).unwrap();
        self.fake.log().destroyed += 1;
    }
}

/// Records the routes the manager publishes.
#[derive(Debug, Default)]
struct RouteBook(Mutex<BTreeMap<String, usize>>);

impl Routes<FakeVm> for RouteBook {
    fn up(&self, sandbox_id: &str, _vm: Arc<FakeVm>) {
        *self.0.lock().unwrap().entry(sandbox_id.into()).or_default() += 1;
    }

    fn down(&self, sandbox_id: &str) {
        self.0.lock().unwrap().remove(sandbox_id);
    }
}

struct Setup {
    _root: tempfile::TempDir,
    config: ManagerConfig,
    base: PathBuf,
    fake: Fake,
    routes: Arc<RouteBook>,
}

fn setup() -> Setup {
    let root = tempfile::tempdir().unwrap();
    let base = root.path().join("cache/template-base/snapshot");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::write(base.join(SNAPSHOT_STATE_FILE), b"state").unwrap();
    let mut config = ManagerConfig::new(root.path().join("data"), root.path().join("run"));
    config.templates.insert("base".into(), base.clone());
    config.capacity = Capacity {
        vcpus: 8,
        memory_mib: 1024,
        disk_mib: 100_000,
        max_sandboxes: 3,
    };
    Setup {
        _root: root,
        config,
        base,
        fake: Fake::default(),
        routes: Arc::default(),
    }
}

impl Setup {
    fn manager(&self) -> SandboxManager<Fake> {
        SandboxManager::open(self.config.clone(), self.fake.clone())
            .unwrap()
            .with_routes(self.routes.clone())
    }

    fn runtime_entries(&self) -> Vec<String> {
        names(&self.config.runtime_root)
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().into_string().unwrap())
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

fn spec(id: &str, template: &str) -> CreateSandbox {
    CreateSandbox {
        sandbox_id: id.into(),
        team_id: "team-1".into(),
        template_id: template.into(),
        vcpus: 1,
        memory_mib: 256,
        disk_mib: 1024,
        env_vars: BTreeMap::from([("A".into(), "1".into())]),
        envd_access_token: Some("tok".into()),
        allow_internet: false,
        allow_out: Vec::new(),
        deny_out: Vec::new(),
    }
}

fn state_of(manager: &SandboxManager<Fake>, id: &str) -> Option<WorkerSandboxState> {
    manager
        .reports()
        .into_iter()
        .find(|r| r.sandbox_id == id)
        .map(|r| r.state)
}

const ID: &str = "cl-abc123";

#[tokio::test]
async fn every_restore_carries_the_egress_policy_and_a_malformed_one_is_refused_up_front() {
    let s = setup();
    let m = s.manager();
    let mut open = spec(ID, "base");
    open.allow_internet = true;
    open.allow_out = vec!["10.1.0.0/16".into(), "*.pypi.org".into()];
    open.deny_out = vec!["0.0.0.0/0".into()];
    m.create(&open).await.unwrap();
    m.pause(ID).await.unwrap();
    m.resume(&open).await.unwrap();
    let want = EgressPolicy::parse(true, &open.allow_out, &open.deny_out).unwrap();
    assert_eq!(
        s.fake.log().egress,
        vec![want.clone(), want],
        "create and resume"
    );

    let mut bad = spec("cl-bad1", "base");
    bad.deny_out = vec!["not a host!".into()];
    let error = m.create(&bad).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::InvalidRequest, "{error}");
    assert!(
        WorkerError::from(error).message.contains("not a host!"),
        "the entry is named"
    );
    assert_eq!(s.fake.log().egress.len(), 2, "nothing restored");
    assert_eq!(state_of(&m, "cl-bad1"), None, "nothing held");
    assert_eq!(s.runtime_entries(), [ID]);
}

#[tokio::test]
async fn create_restores_the_template_with_the_sandboxes_identity_and_kill_removes_it_all() {
    let s = setup();
    let m = s.manager();
    m.create(&spec(ID, "base")).await.unwrap();
    assert_eq!(state_of(&m, ID), Some(WorkerSandboxState::Running));
    {
        let log = s.fake.log();
        let (from, identity) = &log.restores[0];
        assert_eq!(from, &s.base);
        assert_eq!(identity.sandbox_id, ID);
        assert_eq!(identity.hostname, ID);
        assert_eq!(identity.env_vars["A"], "1");
        assert_eq!(identity.access_token.as_deref(), Some("tok"));
        assert!(!identity.entropy.is_empty());
    }
    assert_eq!(s.runtime_entries(), [ID]);
    assert_eq!(s.routes.0.lock().unwrap().get(ID), Some(&1));
    let usage = m.usage();
    assert_eq!((usage.sandboxes, usage.memory_mib), (1, 256));
    let samples = m.metrics(ID).unwrap();
    assert_eq!(samples.len(), 1);
    assert_eq!(samples[0].mem_total, 256 << 20);

    m.kill(ID).await.unwrap();
    assert_eq!(state_of(&m, ID), None);
    assert!(s.runtime_entries().is_empty());
    assert!(s.routes.0.lock().unwrap().is_empty());
    assert_eq!(s.fake.log().destroyed, 1);
    let error = m.kill(ID).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnknownSandbox, "{error}");
}

#[tokio::test]
async fn bad_creates_are_refused_with_the_protocols_kinds() {
    let mut s = setup();
    s.config.capacity.max_sandboxes = 2;
    let m = s.manager();
    let kind = |r: Result<(), ManagerError>| WorkerError::from(r.unwrap_err()).kind;
    assert_eq!(
        kind(m.create(&spec(ID, "nope")).await),
        ErrorKind::UnknownTemplate
    );
    assert_eq!(
        kind(m.create(&spec("../etc", "base")).await),
        ErrorKind::InvalidRequest
    );
    m.create(&spec(ID, "base")).await.unwrap();
    assert_eq!(
        kind(m.create(&spec(ID, "base")).await),
        ErrorKind::InvalidState,
        "the same id twice"
    );
    let mut big = spec("cl-big", "base");
    big.memory_mib = 900;
    assert_eq!(kind(m.create(&big).await), ErrorKind::NoCapacity);
    m.create(&spec("cl-two", "base")).await.unwrap();
    assert_eq!(
        kind(m.create(&spec("cl-three", "base")).await),
        ErrorKind::NoCapacity
    );
    assert_eq!(s.fake.log().restores.len(), 2, "refusals restore nothing");
}

#[tokio::test]
async fn pause_resume_cycles_chain_diffs_on_their_parents() {
    let s = setup();
    let m = s.manager();
    m.create(&spec(ID, "base")).await.unwrap();
    let paused = store::paused_dir(&s.config.data_dir, ID);

    m.pause(ID).await.unwrap();
    assert_eq!(state_of(&m, ID), Some(WorkerSandboxState::Paused));
    assert!(s.runtime_entries().is_empty(), "VM torn down");
    assert!(
        s.routes.0.lock().unwrap().is_empty(),
        "no route while paused"
    );
    assert_eq!(
        s.fake.log().snapshots[0],
        SnapshotCall {
            dir: paused.join("gen-1"),
            kind: SnapshotKind::Diff,
            parent: Some(s.base.clone()),
            resume: false,
        }
    );
    assert_eq!(names(&paused), ["gen-1", "sandbox.json"]);
    assert!(m.metrics(ID).unwrap().is_empty(), "no sample while paused");
    let again = m.pause(ID).await.unwrap_err();
    assert!(
        matches!(
            again,
            ManagerError::WrongState {
                state: "paused",
                ..
            }
        ),
        "{again}"
    );

    for cycle in 1..=3u64 {
        let mut resumed = spec(ID, "base");
        resumed.envd_access_token = Some(format!("tok-{cycle}"));
        m.resume(&resumed).await.unwrap();
        assert_eq!(state_of(&m, ID), Some(WorkerSandboxState::Running));
        let gen_dir = paused.join(format!("gen-{cycle}"));
        {
            let log = s.fake.log();
            let (from, identity) = log.restores.last().unwrap();
            assert_eq!(from, &gen_dir);
            assert_eq!(
                identity.access_token.as_deref(),
                Some(&*format!("tok-{cycle}"))
            );
        }
        let record: PausedRecord = store::read_json(&paused.join("sandbox.json")).unwrap();
        assert!(!record.paused, "marked running after a resume");
        m.pause(ID).await.unwrap();
        let call = s.fake.log().snapshots.last().unwrap().clone();
        assert_eq!(
            call.parent.as_deref(),
            Some(gen_dir.as_path()),
            "diff on its parent"
        );
        assert_eq!(call.dir, paused.join(format!("gen-{}", cycle + 1)));
        // The template's layer, gen-1, gen-2: then gen-3's chain merges (depth 3 here) and
        // the generations it no longer reads go; gen-4 reads gen-3's layer again.
        let kept: &[&str] = match cycle {
            1 => &["gen-1", "gen-2"],
            2 => &["gen-3"],
            _ => &["gen-3", "gen-4"],
        };
        let mut expected: Vec<String> = kept.iter().map(|n| (*n).to_owned()).collect();
        expected.push("sandbox.json".into());
        assert_eq!(
            names(&paused),
            expected,
            "parents are kept while the newest disk chain reads them (cycle {cycle})"
        );
    }
    // The newest generation still resumes after its parents were removed.
    m.resume(&spec(ID, "base")).await.unwrap();
    assert_eq!(
        s.fake.log().restores.last().unwrap().0,
        paused.join("gen-4")
    );
    m.pause(ID).await.unwrap();
    let error = m.resume(&spec("cl-other", "base")).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::UnknownSandbox);

    m.kill(ID).await.unwrap();
    assert!(!paused.exists(), "a killed sandbox's snapshots are removed");
    assert!(s.runtime_entries().is_empty());
}

#[tokio::test]
async fn full_pauses_when_configured_or_without_a_parent() {
    let mut s = setup();
    s.config.pause_snapshot = SnapshotKind::Full;
    let m = s.manager();
    m.create(&spec(ID, "base")).await.unwrap();
    m.pause(ID).await.unwrap();
    let call = s.fake.log().snapshots[0].clone();
    assert_eq!((call.kind, call.parent), (SnapshotKind::Full, None));

    let s = setup();
    let m = s.manager();
    m.create(&spec(ID, "base")).await.unwrap();
    // The template went away under the running clone.
    std::fs::remove_file(s.base.join(SNAPSHOT_STATE_FILE)).unwrap();
    m.pause(ID).await.unwrap();
    let call = s.fake.log().snapshots[0].clone();
    assert_eq!((call.kind, call.parent), (SnapshotKind::Full, None));
}

#[tokio::test]
async fn a_failed_pause_leaves_the_sandbox_running_and_no_partial_snapshot() {
    let s = setup();
    let m = s.manager();
    m.create(&spec(ID, "base")).await.unwrap();
    s.fake.fail_snapshot.store(true, Ordering::SeqCst);
    let error = m.pause(ID).await.unwrap_err();
    assert_eq!(error.kind(), ErrorKind::Internal);
    let message = WorkerError::from(error).message;
    assert!(message.contains("no space left on device"), "{message}");
    assert_eq!(state_of(&m, ID), Some(WorkerSandboxState::Running));
    assert_eq!(s.fake.log().resumes, 1, "the paused VM runs again");
    assert!(names(&store::paused_dir(&s.config.data_dir, ID)).is_empty());
    assert_eq!(s.runtime_entries(), [ID]);
    s.fake.fail_snapshot.store(false, Ordering::SeqCst);
    m.pause(ID).await.unwrap();
    assert_eq!(state_of(&m, ID), Some(WorkerSandboxState::Paused));
}

#[tokio::test]
async fn a_failed_restore_leaves_nothing() {
    let s = setup();
    let m = s.manager();
    s.fake.fail_restore.store(true, Ordering::SeqCst);
    let error = WorkerError::from(m.create(&spec(ID, "base")).await.unwrap_err());
    assert_eq!(error.kind, ErrorKind::Internal);
    assert!(error.message.contains("bad snapshot"), "{}", error.message);
    assert_eq!(state_of(&m, ID), None);
    assert!(s.runtime_entries().is_empty());
    assert_eq!(m.usage().sandboxes, 0);

    // A resume that fails keeps the sandbox paused.
    s.fake.fail_restore.store(false, Ordering::SeqCst);
    m.create(&spec(ID, "base")).await.unwrap();
    m.pause(ID).await.unwrap();
    s.fake.fail_restore.store(true, Ordering::SeqCst);
    m.resume(&spec(ID, "base")).await.unwrap_err();
    assert_eq!(state_of(&m, ID), Some(WorkerSandboxState::Paused));
    s.fake.fail_restore.store(false, Ordering::SeqCst);
    m.resume(&spec(ID, "base")).await.unwrap();
}

#[tokio::test]
async fn snapshots_become_templates_until_deleted() {
    let s = setup();
    let m = s.manager();
    m.create(&spec(ID, "base")).await.unwrap();
    let size = m.snapshot(ID, "snap_1").await.unwrap();
    assert!(size > 0);
    let entry = store::snapshot_entry(&s.config.data_dir, "snap_1");
    assert_eq!(
        s.fake.log().snapshots[0],
        SnapshotCall {
            dir: entry.join("snapshot"),
            kind: SnapshotKind::Full,
            parent: None,
            resume: true,
        }
    );
    assert_eq!(state_of(&m, ID), Some(WorkerSandboxState::Running));
    assert_eq!(m.templates(), ["base", "snap_1"]);
    let dup = m.snapshot(ID, "snap_1").await.unwrap_err();
    assert_eq!(dup.kind(), ErrorKind::InvalidState, "{dup}");
    assert_eq!(
        m.snapshot(ID, "../x").await.unwrap_err().kind(),
        ErrorKind::InvalidRequest
    );
    assert_eq!(
        m.snapshot("cl-nope", "snap_2").await.unwrap_err().kind(),
        ErrorKind::UnknownSandbox
    );
    assert!(!store::snapshot_entry(&s.config.data_dir, "snap_2").exists());

    m.create(&spec("cl-child", "snap_1")).await.unwrap();
    assert_eq!(s.fake.log().restores[1].0, entry.join("snapshot"));

    assert_eq!(
        m.delete_template("base").unwrap_err().kind(),
        ErrorKind::InvalidRequest
    );
    m.delete_template("snap_1").unwrap();
    assert_eq!(m.templates(), ["base"], "no longer offered");
    assert!(entry.exists(), "kept while a clone of it is held");
    assert_eq!(
        m.delete_template("snap_1").unwrap_err().kind(),
        ErrorKind::UnknownTemplate
    );
    // The clone keeps running; its next pause cannot diff against a deleted template.
    m.pause("cl-child").await.unwrap();
    let call = s.fake.log().snapshots.last().unwrap().clone();
    assert_eq!(
        call.parent.as_deref(),
        Some(entry.join("snapshot").as_path())
    );
    m.kill("cl-child").await.unwrap();
    assert!(!entry.exists(), "removed with its last clone");
}

#[tokio::test]
async fn a_restarted_worker_reports_paused_sandboxes_and_snapshots_and_clears_its_runtime_root() {
    let s = setup();
    let m = s.manager();
    m.create(&spec(ID, "base")).await.unwrap();
    m.pause(ID).await.unwrap();
    m.create(&spec("cl-run", "base")).await.unwrap();
    m.snapshot("cl-run", "snap_keep").await.unwrap();
    // The worker dies: its VMs die with it, their runtime directories stay behind.
    drop(m);
    assert_eq!(s.runtime_entries(), ["cl-run"]);

    let m = s.manager();
    assert!(
        s.runtime_entries().is_empty(),
        "stale runtime directory removed"
    );
    assert_eq!(
        m.reports(),
        [SandboxReport {
            sandbox_id: ID.into(),
            state: WorkerSandboxState::Paused
        }]
    );
    assert_eq!(m.templates(), ["base", "snap_keep"]);
    m.resume(&spec(ID, "base")).await.unwrap();
    let (from, _) = s.fake.log().restores.last().unwrap().clone();
    assert_eq!(
        from,
        store::paused_dir(&s.config.data_dir, ID).join("gen-1")
    );
    m.pause(ID).await.unwrap();
    assert_eq!(
        names(&store::paused_dir(&s.config.data_dir, ID)),
        ["gen-1", "gen-2", "sandbox.json"],
        "generations continue after a restart"
    );
}

#[tokio::test]
async fn shutdown_stops_running_vms_keeps_paused_ones_and_refuses_new_work() {
    let s = setup();
    let m = s.manager();
    m.create(&spec(ID, "base")).await.unwrap();
    m.create(&spec("cl-two", "base")).await.unwrap();
    m.pause("cl-two").await.unwrap();
    m.resume(&spec("cl-two", "base")).await.unwrap();
    m.create(&spec("cl-three", "base")).await.unwrap();
    m.pause("cl-three").await.unwrap();
    m.shutdown().await;
    assert!(s.runtime_entries().is_empty());
    assert_eq!(
        s.fake.log().destroyed,
        4,
        "two pauses, two running at shutdown"
    );
    assert!(s.routes.0.lock().unwrap().is_empty());
    assert_eq!(
        names(&s.config.data_dir.join("paused")),
        ["cl-three"],
        "a resumed sandbox's old snapshot is dropped, a paused one kept"
    );
    assert_eq!(
        m.create(&spec("cl-four", "base")).await.unwrap_err().kind(),
        ErrorKind::InvalidState
    );
}

#[test]
fn older_generations_go_only_when_the_newest_chain_provably_does_not_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let paused = dir.path();
    for n in 1..=4 {
        let generation = paused.join(format!("gen-{n}"));
        std::fs::create_dir(&generation).unwrap();
        std::fs::write(generation.join("disk0.layer"), b"layer").unwrap();
    }
    std::fs::write(paused.join("sandbox.json"), b"{}").unwrap();
    let layer = |n: u32| paused.join(format!("gen-{n}/disk0.layer"));
    let all = ["gen-1", "gen-2", "gen-3", "gen-4", "sandbox.json"];

    // A VMM that did not report its chain: nothing can be known, nothing goes.
    remove_unneeded_generations(paused, 4, None);
    assert_eq!(names(paused), all);
    // A layer that cannot be resolved: nothing goes either.
    let missing = paused.join("gen-9/disk0.layer");
    remove_unneeded_generations(paused, 4, Some(&[layer(2), missing]));
    assert_eq!(names(paused), all);
    // The chain reads gen-2 and gen-4 (through a path of another form): gen-1 and gen-3 go.
    let roundabout = paused.join("gen-1/../gen-2/disk0.layer");
    remove_unneeded_generations(paused, 4, Some(&[roundabout, layer(4)]));
    assert_eq!(names(paused), ["gen-2", "gen-4", "sandbox.json"]);
    // Newer generations are never this function's to remove.
    remove_unneeded_generations(paused, 2, Some(&[layer(2)]));
    assert_eq!(names(paused), ["gen-2", "gen-4", "sandbox.json"]);
}
