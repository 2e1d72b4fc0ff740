//! Where a pool's clones come from: [`CloneSource`], and the real source over [`VmHandle`]
//! restores of one template snapshot.

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use roost_net::{NetManager, SandboxNet};
use roost_proto::agent::IdentityRequest;

use super::PoolError;
use crate::vm_handle::{RestoreConfig, VmHandle};

/// Makes and identifies clones of one template.
pub trait CloneSource: Send + Sync + 'static {
    type Clone: Send + 'static;

    /// Restores a clone whose agent answers, still with the template's identity.
    fn restore_warm(&self) -> impl Future<Output = Result<Self::Clone, PoolError>> + Send;

    /// Hands a warm clone its identity.
    fn identify(
        &self,
        clone: &mut Self::Clone,
        identity: &IdentityRequest,
    ) -> impl Future<Output = Result<(), PoolError>> + Send;

    /// Restores a clone and hands it `identity` at once (a pool miss).
    fn restore_identified(
        &self,
        identity: &IdentityRequest,
    ) -> impl Future<Output = Result<Self::Clone, PoolError>> + Send;

    /// False once the clone's VM is gone.
    fn is_alive(&self, clone: &Self::Clone) -> bool;
}

/// Clones restored by `roost vm run --restore` processes ([`VmHandle`]), each in its own
/// runtime directory `<runtime_root>/pool-<template>-<n>`. With networking, each clone waits
/// in reserved networking of its own (a slot that refuses everything) that the taker gives
/// the sandbox's policy.
#[derive(Debug)]
pub struct HandleSource {
    /// The restore settings shared by every clone (its `runtime_dir` is replaced per clone).
    restore: RestoreConfig,
    runtime_root: PathBuf,
    template: String,
    identity_timeout: Duration,
    next: AtomicU64,
    net: Option<NetManager>,
}

impl HandleSource {
    /// Clones of the snapshot `restore.snapshot_dir`, with runtime directories under
    /// `runtime_root`, named after `template`.
    pub fn new(
        restore: RestoreConfig,
        runtime_root: impl Into<PathBuf>,
        template: impl Into<String>,
    ) -> Self {
        Self {
            identity_timeout: restore.ready_timeout,
            restore,
            runtime_root: runtime_root.into(),
            template: template.into(),
            next: AtomicU64::new(0),
            net: None,
        }
    }

    /// Restores every clone in reserved networking from `net` (none: no network namespace).
    pub fn with_network(mut self, net: Option<NetManager>) -> Self {
        self.net = net;
        self
    }

    /// Reserved networking for one clone, and its settings pointing into it.
    async fn prepare(&self) -> Result<(RestoreConfig, Option<SandboxNet>), PoolError> {
        let mut config = self.config();
        let Some(net) = &self.net else {
            return Ok((config, None));
        };
        let network = net
            .reserve()
            .await
            .map_err(|e| PoolError::Restore(Box::new(e)))?;
        config.netns = Some(network.netns().to_owned());
        Ok((config, Some(network)))
    }

    fn config(&self) -> RestoreConfig {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut config = self.restore.clone();
        config.runtime_dir =
            self.runtime_root
                .join(format!("pool-{}-{}-{n}", self.template, std::process::id()));
        config
    }
}

impl CloneSource for HandleSource {
    type Clone = VmHandle;

    async fn restore_warm(&self) -> Result<VmHandle, PoolError> {
        let (config, network) = self.prepare().await?;
        let vm = VmHandle::restore_warm(config)
            .await
            .map_err(|e| PoolError::Restore(Box::new(e)))?;
        Ok(with_network(vm, network))
    }

    async fn identify(
        &self,
        clone: &mut VmHandle,
        identity: &IdentityRequest,
    ) -> Result<(), PoolError> {
        clone
            .take_identity(identity, self.identity_timeout)
            .await
            .map_err(|e| PoolError::Identity(Box::new(e)))
    }

    async fn restore_identified(&self, identity: &IdentityRequest) -> Result<VmHandle, PoolError> {
        let (config, network) = self.prepare().await?;
        let vm = VmHandle::restore(config, identity)
            .await
            .map_err(|e| PoolError::Restore(Box::new(e)))?;
        Ok(with_network(vm, network))
    }

    fn is_alive(&self, clone: &VmHandle) -> bool {
        clone.exit().is_none()
    }
}

/// `vm` owning `network` (removed with it).
fn with_network(mut vm: VmHandle, network: Option<SandboxNet>) -> VmHandle {
    if let Some(network) = network {
        vm.attach_network(network);
    }
    vm
}
