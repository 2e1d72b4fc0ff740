//! Running processes by pid (and tag), each with its input ends and the subscribers that
//! receive its output: the `Start` stream and any number of `Connect` streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::fd_io::AsyncDescriptor;
use crate::envd::connect::ConnectError;
use crate::envd::proto::process::process_event::{DataEvent, EndEvent};
use crate::envd::proto::process::{ProcessConfig, ProcessInfo, ProcessSelector, process_selector};

/// What subscribers receive.
#[derive(Debug, Clone)]
pub enum Output {
    Data(DataEvent),
    End(EndEvent),
}

/// How many events may queue per subscriber before the process's output waits for it.
const SUBSCRIBER_QUEUE: usize = 256;

#[derive(Debug, Default)]
struct Subscribers {
    senders: Vec<mpsc::Sender<Output>>,
    /// Set once the process has ended: late subscribers get it at once.
    end: Option<EndEvent>,
}

/// One running process.
#[derive(Debug)]
pub struct ProcessHandle {
    pub pid: u32,
    pub config: ProcessConfig,
    pub tag: Option<String>,
    /// The write end of the stdin pipe; `None` once closed or when stdin was not requested.
    pub stdin: tokio::sync::Mutex<Option<Arc<AsyncDescriptor>>>,
    /// The PTY master, for input and resizing.
    pub pty: Option<Arc<AsyncDescriptor>>,
    subscribers: Mutex<Subscribers>,
}

impl ProcessHandle {
    pub fn new(
        pid: u32,
        config: ProcessConfig,
        tag: Option<String>,
        stdin: Option<Arc<AsyncDescriptor>>,
        pty: Option<Arc<AsyncDescriptor>>,
    ) -> Self {
        Self {
            pid,
            config,
            tag,
            stdin: tokio::sync::Mutex::new(stdin),
            pty,
            subscribers: Mutex::new(Subscribers::default()),
        }
    }

    fn subscribers(&self) -> std::sync::MutexGuard<'_, Subscribers> {
        self.subscribers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new subscriber; it sees output from now on (and the end, even if already past).
    pub fn subscribe(&self) -> mpsc::Receiver<Output> {
        let (sender, receiver) = mpsc::channel(SUBSCRIBER_QUEUE);
        let mut subscribers = self.subscribers();
        if let Some(end) = &subscribers.end {
            // A fresh channel has room for one message.
            let _ = sender.try_send(Output::End(end.clone()));
        } else {
            subscribers.senders.push(sender);
        }
        receiver
    }

    /// Delivers output to every subscriber, waiting for slow ones (no output is dropped).
    pub async fn publish(&self, data: DataEvent) {
        let senders = self.subscribers().senders.clone();
        let mut gone = false;
        for sender in senders {
            gone |= sender.send(Output::Data(data.clone())).await.is_err();
        }
        if gone {
            self.subscribers().senders.retain(|s| !s.is_closed());
        }
    }

    /// Delivers the end and closes every subscription.
    pub async fn finish(&self, end: EndEvent) {
        let senders = {
            let mut subscribers = self.subscribers();
            subscribers.end = Some(end.clone());
            std::mem::take(&mut subscribers.senders)
        };
        for sender in senders {
            let _ = sender.send(Output::End(end.clone())).await;
        }
    }

    pub fn info(&self) -> ProcessInfo {
        ProcessInfo {
            config: Some(self.config.clone()),
            pid: self.pid,
            tag: self.tag.clone(),
        }
    }
}

/// Every process started through the API that has not ended yet.
#[derive(Debug, Default)]
pub struct Registry {
    by_pid: Mutex<HashMap<u32, Arc<ProcessHandle>>>,
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<u32, Arc<ProcessHandle>>> {
        self.by_pid
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn insert(&self, handle: Arc<ProcessHandle>) {
        self.map().insert(handle.pid, handle);
    }

    pub fn remove(&self, pid: u32) {
        self.map().remove(&pid);
    }

    pub fn list(&self) -> Vec<ProcessInfo> {
        let mut infos: Vec<ProcessInfo> = self.map().values().map(|h| h.info()).collect();
        infos.sort_by_key(|info| info.pid);
        infos
    }

    /// The process a selector names.
    pub fn find(
        &self,
        selector: Option<&ProcessSelector>,
    ) -> Result<Arc<ProcessHandle>, ConnectError> {
        let selector = selector
            .and_then(|s| s.selector.as_ref())
            .ok_or_else(|| ConnectError::invalid("a process selector (pid or tag) is required"))?;
        let map = self.map();
        let found = match selector {
            process_selector::Selector::Pid(pid) => map.get(pid).cloned(),
            process_selector::Selector::Tag(tag) => map
                .values()
                .find(|h| h.tag.as_deref() == Some(tag.as_str()))
                .cloned(),
        };
        found.ok_or_else(|| {
            let what = match selector {
                process_selector::Selector::Pid(pid) => format!("pid {pid}"),
                process_selector::Selector::Tag(tag) => format!("tag `{tag}`"),
            };
            ConnectError::not_found(format!("process with {what} not found"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handle(pid: u32, tag: Option<&str>) -> Arc<ProcessHandle> {
        Arc::new(ProcessHandle::new(
            pid,
            ProcessConfig::default(),
            tag.map(Into::into),
            None,
            None,
        ))
    }

    #[tokio::test]
    async fn subscribers_get_data_then_end_and_late_ones_get_the_end() {
        let h = handle(1, None);
        let mut early = h.subscribe();
        h.publish(DataEvent { output: None }).await;
        h.finish(EndEvent {
            exit_code: 3,
            ..Default::default()
        })
        .await;
        assert!(matches!(early.recv().await, Some(Output::Data(_))));
        assert!(matches!(early.recv().await, Some(Output::End(e)) if e.exit_code == 3));
        assert!(early.recv().await.is_none());
        let mut late = h.subscribe();
        assert!(matches!(late.recv().await, Some(Output::End(_))));
    }

    #[test]
    fn find_by_pid_and_tag() {
        let registry = Registry::default();
        registry.insert(handle(10, Some("web")));
        let by = |selector| ProcessSelector {
            selector: Some(selector),
        };
        assert_eq!(
            registry
                .find(Some(&by(process_selector::Selector::Pid(10))))
                .unwrap()
                .pid,
            10
        );
        assert_eq!(
            registry
                .find(Some(&by(process_selector::Selector::Tag("web".into()))))
                .unwrap()
                .pid,
            10
        );
        assert!(
            registry
                .find(Some(&by(process_selector::Selector::Pid(11))))
                .is_err()
        );
        assert!(registry.find(None).is_err());
        registry.remove(10);
        assert!(registry.list().is_empty());
    }
}
