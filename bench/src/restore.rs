//! `roost-bench restore`: what starting a sandbox from a template snapshot costs against a
//! cold boot, through the worker's own path ([`VmHandle`], [`ClonePool`]) on real KVM (run it
//! inside the host VM: `roost hostvm run -- roost-bench restore --json`).
//!
//! One template is made first: a VM booted from the base image, its agent ready, snapshotted
//! in full. Then, per round and interleaved so machine noise hits every variant alike:
//! - **cold boot**: `roost vm run` booting the kernel and image;
//! - **restore, map**: the snapshot's memory file mapped `MAP_PRIVATE`;
//! - **restore, uffd**: memory filled on demand by a `roost-pager serve` child;
//! - **restore, uffd + prefetch**: the same, replaying first the working set a clone recorded
//!   until its first command finished (recorded once, before the rounds);
//! - **pool hit**: a warm clone from a [`ClonePool`] handed its identity.
//!
//! Each is timed to the agent ready (after a restore: its identity applied) and to a first
//! command (`true`) completed. Then: host PSS per idle clone with 10 clones of the template
//! alive (mapped memory), and snapshot times of a running clone — full, and a diff after the
//! guest wrote about 5% of its memory.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use roost_agent_client::exec_argv;
use roost_proto::agent::IdentityRequest;
use roost_worker::pool::{ClonePool, HandleSource, PoolConfig};
use roost_worker::vm_handle::{
    PagerOptions, RestoreConfig, RestoreMemory, SnapshotKind, VmHandle, VmHandleConfig,
};

use crate::guest_boot::GuestImages;
use crate::stats;

/// How long one VM may take to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a recorded working set may take to be written.
const WORKING_SET_TIMEOUT: Duration = Duration::from_secs(30);
/// How long idle clones settle before their memory is read.
const SETTLE: Duration = Duration::from_secs(2);

/// What to measure.
#[derive(Debug, Clone)]
pub struct RestoreBench {
    /// The rootfs image (index name) the template is made from.
    pub image: String,
    /// Rounds of the start-up variants (medians over these).
    pub runs: usize,
    /// Clones alive at once for the memory figure.
    pub clones: usize,
    /// Guest memory of the template.
    pub mem_mib: u64,
    /// Scratch directory (runtime directories, snapshots); removed afterwards.
    pub work_dir: PathBuf,
}

/// Medians in milliseconds; ratios of medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub runs: usize,
    pub mem_mib: u64,
    /// To the first command completed (the time a user waits).
    pub cold_boot_ms: f64,
    pub restore_map_ms: f64,
    pub restore_uffd_ms: f64,
    pub restore_uffd_prefetch_ms: f64,
    pub pool_hit_ms: f64,
    /// To the agent ready (after a restore: its identity applied), without the command.
    pub cold_boot_ready_ms: f64,
    pub restore_map_ready_ms: f64,
    pub restore_uffd_ready_ms: f64,
    pub restore_uffd_prefetch_ready_ms: f64,
    pub pool_hit_ready_ms: f64,
    /// Best restore ÷ cold boot (goal ≤ 0.05).
    pub restore_over_boot: f64,
    /// Pool hit ÷ best restore (goal ≤ 0.1).
    pub pool_over_restore: f64,
    /// Pages in the recorded working set.
    pub working_set_pages: u64,
    pub clones: usize,
    /// Host PSS of one idle clone's VMM process ÷ guest memory, in percent (goal ≤ 5).
    pub pss_per_clone_pct: f64,
    pub pss_per_clone_mib: f64,
    /// A snapshot of every page vs a diff after the guest wrote ~5% of its memory.
    pub full_snapshot_ms: f64,
    pub pause_5pct_ms: f64,
    /// Share of guest memory the diff actually wrote, in percent.
    pub pause_5pct_written_pct: f64,
    /// pause_5pct ÷ full (goal ≤ 0.1).
    pub pause_over_full: f64,
}

/// Samples of one variant: to ready and to first command completed.
#[derive(Debug, Default)]
struct Samples {
    ready_ms: Vec<f64>,
    first_cmd_ms: Vec<f64>,
}

impl Samples {
    fn push(&mut self, ready: Duration, first_cmd: Duration) {
        self.ready_ms.push(ms(ready));
        self.first_cmd_ms.push(ms(first_cmd));
    }

    fn medians(&self, what: &str) -> anyhow::Result<(f64, f64)> {
        Ok((
            stats::median(&self.ready_ms).with_context(|| format!("no {what} samples"))?,
            stats::median(&self.first_cmd_ms).with_context(|| format!("no {what} samples"))?,
        ))
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl RestoreBench {
    pub async fn run(&self) -> anyhow::Result<RestoreReport> {
        ensure!(self.runs > 0, "--runs must be at least 1");
        let images = GuestImages::from_index(&self.image).context("finding the guest images")?;
        std::fs::create_dir_all(&self.work_dir)
            .with_context(|| format!("creating {}", self.work_dir.display()))?;
        let template = self.work_dir.join("template");
        let t = Instant::now();
        self.make_template(&images, &template).await?;
        eprintln!(
            "template: booted and snapshotted in {:.0} ms",
            ms(t.elapsed())
        );

        let working_set = self.work_dir.join("working-set");
        let working_set_pages = self.record_working_set(&template, &working_set).await?;
        eprintln!("working set: {working_set_pages} pages recorded until the first command");

        let pool = ClonePool::start(
            HandleSource::new(
                self.restore_config(&template, RestoreMemory::Map),
                self.work_dir.clone(),
                "bench",
            ),
            PoolConfig {
                template: "bench".into(),
                target: 1,
                memory_budget_mib: self.mem_mib,
                clone_memory_mib: self.mem_mib,
            },
        )?;
        let uffd = |prefetch: Option<PathBuf>| {
            RestoreMemory::Uffd(PagerOptions {
                prefetch,
                ..PagerOptions::new()
            })
        };
        let (mut cold, mut map, mut paged, mut prefetched, mut hit) = Default::default();
        for round in 0..self.runs {
            let n = round + 1;
            let (r, c) = self.cold_boot(&images, round).await?;
            Samples::push(&mut cold, r, c);
            let (r, c) = self.restore(&template, RestoreMemory::Map, round).await?;
            Samples::push(&mut map, r, c);
            let (r, c) = self.restore(&template, uffd(None), round).await?;
            Samples::push(&mut paged, r, c);
            let (r, c) = self
                .restore(&template, uffd(Some(working_set.clone())), round)
                .await?;
            Samples::push(&mut prefetched, r, c);
            ensure!(
                pool.wait_full(READY_TIMEOUT).await,
                "the pool did not refill: {:?}",
                pool.stats()
            );
            let (r, c) = pool_hit(&pool, round).await?;
            Samples::push(&mut hit, r, c);
            eprintln!(
                "round {n}/{}: first command after cold boot {:.0} ms, map {:.0}, uffd {:.0}, \
                 uffd+prefetch {:.0}, pool hit {:.0}",
                self.runs,
                cold.first_cmd_ms[round],
                map.first_cmd_ms[round],
                paged.first_cmd_ms[round],
                prefetched.first_cmd_ms[round],
                hit.first_cmd_ms[round],
            );
        }
        let stats = pool.stats();
        pool.shutdown().await;
        ensure!(
            stats.hits == u64::try_from(self.runs)?,
            "every pool take should have been a hit: {stats:?}"
        );

        let pss_kib = self.pss_per_clone(&template).await?;
        let (full_ms, diff_ms, written_pct) = self.snapshot_times(&template).await?;

        let (cold_ready, cold_cmd) = cold.medians("cold boot")?;
        let (map_ready, map_cmd) = map.medians("map")?;
        let (uffd_ready, uffd_cmd) = paged.medians("uffd")?;
        let (pre_ready, pre_cmd) = prefetched.medians("prefetch")?;
        let (hit_ready, hit_cmd) = hit.medians("pool")?;
        let best_restore = map_cmd.min(uffd_cmd).min(pre_cmd);
        let guest_kib = self.mem_mib as f64 * 1024.0;
        let report = RestoreReport {
            runs: self.runs,
            mem_mib: self.mem_mib,
            cold_boot_ms: cold_cmd,
            restore_map_ms: map_cmd,
            restore_uffd_ms: uffd_cmd,
            restore_uffd_prefetch_ms: pre_cmd,
            pool_hit_ms: hit_cmd,
            cold_boot_ready_ms: cold_ready,
            restore_map_ready_ms: map_ready,
            restore_uffd_ready_ms: uffd_ready,
            restore_uffd_prefetch_ready_ms: pre_ready,
            pool_hit_ready_ms: hit_ready,
            restore_over_boot: best_restore / cold_cmd,
            pool_over_restore: hit_cmd / best_restore,
            working_set_pages,
            clones: self.clones,
            pss_per_clone_pct: pss_kib / guest_kib * 100.0,
            pss_per_clone_mib: pss_kib / 1024.0,
            full_snapshot_ms: full_ms,
            pause_5pct_ms: diff_ms,
            pause_5pct_written_pct: written_pct,
            pause_over_full: diff_ms / full_ms,
        };
        let _ = std::fs::remove_dir_all(&self.work_dir);
        Ok(report)
    }

    fn restore_config(&self, template: &Path, memory: RestoreMemory) -> RestoreConfig {
        let mut config = RestoreConfig::new(template, self.work_dir.join("unused"));
        config.ready_timeout = READY_TIMEOUT;
        config.memory = memory;
        config
    }

    fn boot_config(&self, images: &GuestImages, name: &str) -> VmHandleConfig {
        let mut config =
            VmHandleConfig::new(&images.kernel, &images.rootfs, self.work_dir.join(name));
        config.mem_mib = self.mem_mib;
        config.ready_timeout = READY_TIMEOUT;
        config
    }

    /// Boots the template VM, runs one command (as a build would) and snapshots it in full.
    async fn make_template(&self, images: &GuestImages, dir: &Path) -> anyhow::Result<()> {
        let mut config = self.boot_config(images, "template-vm");
        config.control_api = true;
        let vm = VmHandle::boot(config)
            .await
            .context("booting the template VM")?;
        first_command(&vm).await?;
        vm.snapshot(dir, SnapshotKind::Full, None, false)
            .await
            .context("snapshotting the template VM")?;
        vm.kill();
        Ok(())
    }

    /// Restores once with the page server recording, runs the first command, and has the
    /// pages touched so far written to `file`.
    async fn record_working_set(&self, template: &Path, file: &Path) -> anyhow::Result<u64> {
        let mut config = self.restore_config(
            template,
            RestoreMemory::Uffd(PagerOptions {
                record: Some(file.to_owned()),
                ..PagerOptions::new()
            }),
        );
        config.runtime_dir = self.work_dir.join("record");
        let vm = VmHandle::restore(config, &identity("record")?)
            .await
            .context("restoring the clone that records the working set")?;
        first_command(&vm).await?;
        ensure!(vm.record_working_set(), "the page server is gone");
        let deadline = Instant::now() + WORKING_SET_TIMEOUT;
        // Complete once it parses (the page server may still be writing it).
        let pages = loop {
            if let Some(pages) = working_set_pages(file) {
                break pages;
            }
            if Instant::now() > deadline {
                bail!(
                    "the page server wrote no working set to {} within {WORKING_SET_TIMEOUT:?}",
                    file.display()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        vm.kill();
        Ok(pages)
    }

    async fn cold_boot(
        &self,
        images: &GuestImages,
        round: usize,
    ) -> anyhow::Result<(Duration, Duration)> {
        let started = Instant::now();
        let vm = VmHandle::boot(self.boot_config(images, &format!("cold-{round}")))
            .await
            .context("cold boot")?;
        let ready = started.elapsed();
        first_command(&vm).await?;
        let done = started.elapsed();
        vm.kill();
        Ok((ready, done))
    }

    async fn restore(
        &self,
        template: &Path,
        memory: RestoreMemory,
        round: usize,
    ) -> anyhow::Result<(Duration, Duration)> {
        let what = match &memory {
            RestoreMemory::Map => "map",
            RestoreMemory::Uffd(PagerOptions { prefetch: None, .. }) => "uffd",
            RestoreMemory::Uffd(_) => "prefetch",
        };
        let mut config = self.restore_config(template, memory);
        config.runtime_dir = self.work_dir.join(format!("{what}-{round}"));
        let id = identity(&format!("{what}-{round}"))?;
        let started = Instant::now();
        let vm = VmHandle::restore(config, &id)
            .await
            .with_context(|| format!("restore ({what})"))?;
        let ready = started.elapsed();
        first_command(&vm).await?;
        let done = started.elapsed();
        vm.kill();
        Ok((ready, done))
    }

    /// Host PSS (KiB) per idle clone, `self.clones` clones alive.
    async fn pss_per_clone(&self, template: &Path) -> anyhow::Result<f64> {
        let mut vms = Vec::with_capacity(self.clones);
        for n in 0..self.clones {
            let mut config = self.restore_config(template, RestoreMemory::Map);
            config.runtime_dir = self.work_dir.join(format!("density-{n}"));
            let vm = VmHandle::restore(config, &identity(&format!("density-{n}"))?)
                .await
                .with_context(|| format!("restoring clone {n} of {}", self.clones))?;
            first_command(&vm).await?;
            vms.push(vm);
        }
        tokio::time::sleep(SETTLE).await;
        let mut total = 0u64;
        for vm in &vms {
            total += pss_kib(vm.vmm_pid())?;
        }
        for vm in vms {
            vm.kill();
        }
        Ok(total as f64 / self.clones as f64)
    }

    /// Median full-snapshot and diff-snapshot times (ms) of a running clone, and the share of
    /// memory the diffs wrote (percent).
    async fn snapshot_times(&self, template: &Path) -> anyhow::Result<(f64, f64, f64)> {
        let mut config = self.restore_config(template, RestoreMemory::Map);
        config.runtime_dir = self.work_dir.join("pause");
        let vm = VmHandle::restore(config, &identity("pause")?)
            .await
            .context("restoring the clone to snapshot")?;
        let dirty_bytes = self.mem_mib * (1 << 20) / 20;
        let dirty = format!("dd if=/dev/urandom of=/dev/null bs={dirty_bytes} count=1 2>/dev/null");
        let (mut full, mut diff, mut written) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..self.runs {
            let base = self.work_dir.join(format!("full-{round}"));
            let started = Instant::now();
            vm.snapshot(&base, SnapshotKind::Full, None, true)
                .await
                .context("full snapshot")?;
            full.push(ms(started.elapsed()));
            let out = vm
                .run(exec_argv(["sh", "-c", &dirty]))
                .await
                .context("dirtying guest memory")?;
            ensure!(out.status.success(), "dd in the guest failed: {out:?}");
            let next = self.work_dir.join(format!("diff-{round}"));
            let started = Instant::now();
            let info = vm
                .snapshot(&next, SnapshotKind::Diff, Some(&base), true)
                .await
                .context("diff snapshot")?;
            diff.push(ms(started.elapsed()));
            let pages = self.mem_mib * 256;
            written.push(info.memory_pages_written as f64 / pages as f64 * 100.0);
            eprintln!(
                "snapshot {}/{}: full {:.0} ms, diff {:.0} ms ({} pages written)",
                round + 1,
                self.runs,
                full[round],
                diff[round],
                info.memory_pages_written
            );
            for dir in [&base, &next] {
                std::fs::remove_dir_all(dir)
                    .with_context(|| format!("removing {}", dir.display()))?;
            }
        }
        vm.kill();
        Ok((
            stats::median(&full).context("no samples")?,
            stats::median(&diff).context("no samples")?,
            stats::median(&written).context("no samples")?,
        ))
    }
}

/// Takes a warm clone from `pool` (timed to its identity applied and its first command).
async fn pool_hit(
    pool: &ClonePool<HandleSource>,
    round: usize,
) -> anyhow::Result<(Duration, Duration)> {
    let id = identity(&format!("pool-{round}"))?;
    let started = Instant::now();
    let taken = pool.take(&id).await.context("pool take")?;
    let ready = started.elapsed();
    ensure!(taken.from_pool, "the pool was empty");
    first_command(&taken.clone).await?;
    let done = started.elapsed();
    taken.clone.kill();
    Ok((ready, done))
}

async fn first_command(vm: &VmHandle) -> anyhow::Result<()> {
    let out = vm
        .run(exec_argv(["true"]))
        .await
        .context("the first command")?;
    ensure!(out.status.success(), "`true` failed in the guest: {out:?}");
    Ok(())
}

fn identity(name: &str) -> anyhow::Result<IdentityRequest> {
    IdentityRequest::new(name, name).context("reading host entropy")
}

/// The number of pages in a complete working-set file (`roost-pager`'s JSON), if complete.
fn working_set_pages(file: &Path) -> Option<u64> {
    let bytes = std::fs::read(file).ok()?;
    let set: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    set.get("pages")?.as_array()?.len().try_into().ok()
}

/// The `Pss:` line of `/proc/PID/smaps_rollup`, in KiB.
fn pss_kib(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/smaps_rollup");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    parse_pss_kib(&text).with_context(|| format!("no Pss line in {path}"))
}

fn parse_pss_kib(smaps_rollup: &str) -> Option<u64> {
    smaps_rollup
        .lines()
        .find_map(|line| line.strip_prefix("Pss:"))
        .and_then(|rest| rest.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pss_is_read_from_smaps_rollup() {
        let text = "55d0-7ffd ---p 00000000 00:00 0 [rollup]\nRss:               21344 kB\n\
                    Pss:               12007 kB\nPss_Dirty:          9000 kB\n";
        assert_eq!(parse_pss_kib(text), Some(12007));
        assert_eq!(parse_pss_kib("Rss: 1 kB\n"), None);
    }

    #[test]
    fn medians_need_samples() {
        let samples = Samples::default();
        assert!(samples.medians("x").is_err());
        let mut samples = Samples::default();
        samples.push(Duration::from_millis(10), Duration::from_millis(30));
        samples.push(Duration::from_millis(20), Duration::from_millis(40));
        samples.push(Duration::from_millis(30), Duration::from_millis(50));
        assert_eq!(samples.medians("x").unwrap(), (20.0, 40.0));
    }
}
