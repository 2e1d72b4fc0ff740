//! Running one command in a host VM: prepare the archives, start QEMU, pump the command's
//! output, follow `/init` on the control port, and turn the result into a [`RunOutcome`] or a
//! [`HostVmError`] that carries the console tail.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use roost_images::{ArtefactIndex, Cache, IndexError, Progress};

use crate::HostVmError;
use crate::forward::Forward;
use crate::initramfs::BaseInitramfs;
use crate::kernel::HostKernel;
use crate::overlay::{self, AttachedImage, Overlay};
use crate::protocol::{self, Control};
use crate::qemu::{self, Endpoints, QemuConfig, QemuProcess};

/// Index name of the guest kernel, carried inside the initramfs when built.
pub const KERNEL_NAME: &str = "kernel";
/// Index names of the images attached as disks when built.
pub const IMAGE_NAMES: &[&str] = &["rootfs-base", "rootfs-code-interpreter"];

/// How long QEMU may take to open its sockets.
const SOCKET_WAIT: Duration = Duration::from_secs(20);
/// How long the host VM may take to power off after the command exited.
const POWER_OFF_GRACE: Duration = Duration::from_secs(20);
/// How long `/init` may go without a heartbeat (it sends one every
/// [`protocol::HEARTBEAT_SECS`]) before the host VM counts as wedged.
const SILENCE_LIMIT: Duration = Duration::from_secs(60);
/// How many times a boot that hangs before `/init` is tried.
const BOOT_ATTEMPTS: u32 = 2;
/// Console lines quoted in errors.
const CONSOLE_TAIL: usize = 80;
/// Lines of captured command output kept in a timeout error.
const OUTPUT_TAIL: usize = 60;

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdout,
    Stderr,
}

/// One line of the command's output (without its newline).
#[derive(Debug, Clone, Copy)]
pub struct OutputLine<'a> {
    pub stream: StreamKind,
    pub line: &'a str,
    /// Time since QEMU started.
    pub since_start: Duration,
}

type LineSink = Box<dyn FnMut(OutputLine<'_>) + Send>;

/// Where the command's output goes.
pub enum Output {
    /// Line by line to this process's stdout and stderr.
    Inherit,
    /// Kept in [`RunOutcome::stdout`] and [`RunOutcome::stderr`].
    Capture,
    /// Handed to a callback line by line, as it arrives.
    Lines(LineSink),
}

impl std::fmt::Debug for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Inherit => "Inherit",
            Self::Capture => "Capture",
            Self::Lines(_) => "Lines(..)",
        })
    }
}

/// Progress of a run, reported as it happens.
#[derive(Debug, Clone)]
pub enum Event {
    /// `/init` is running.
    Booted(BootTimes),
    /// `/init` started a setup stage (`modules`, `kvm`, `network`, `disks`).
    Stage { name: String, since_start: Duration },
    /// The command starts.
    CommandStarted { since_start: Duration },
}

/// How long the host VM took to boot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BootTimes {
    /// Wall time from starting QEMU to `/init` running.
    pub qemu_to_init: Duration,
    /// The guest kernel's uptime when `/init` started (`/proc/uptime`).
    pub kernel_uptime_at_init: Duration,
}

/// The result of a run whose command ran to completion.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// The command's exit status (0–255).
    pub exit_code: i32,
    pub boot: BootTimes,
    /// Wall time from starting QEMU to the command starting (boot and setup).
    pub ready_after: Duration,
    /// Wall time of the command itself.
    pub command_time: Duration,
    /// Wall time of the whole run, preparation included.
    pub total: Duration,
    /// Captured output ([`Output::Capture`] only).
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// Index names of the artefacts made available inside.
    pub attached: Vec<String>,
    /// How many earlier runs were killed because the host VM wedged
    /// ([`HostVm::retries_when_wedged`]).
    pub wedged_runs: u32,
}

/// Which of the project's binaries to copy in.
#[derive(Debug, Clone)]
enum Binaries {
    /// Every executable next to the running one (or next to `target/<profile>/deps`).
    Auto,
    /// These files.
    List(Vec<PathBuf>),
}

/// A host VM run being configured; [`HostVm::run`] boots it.
#[derive(Debug)]
pub struct HostVm {
    cpus: u32,
    mem_mib: u32,
    forwards: Vec<Forward>,
    timeout: Duration,
    boot_timeout: Duration,
    env: Vec<(String, String)>,
    output: Output,
    binaries: Binaries,
    images: Vec<String>,
    files: Vec<(String, PathBuf)>,
    strip_debug: bool,
    cache: Option<Cache>,
    progress: Progress,
    cancel: Option<Arc<AtomicBool>>,
    on_event: Option<EventSink>,
    wedge_retries: u32,
}

struct EventSink(Box<dyn FnMut(&Event) + Send>);

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink")
    }
}

impl HostVm {
    /// Defaults: 2 vCPUs, 4096 MiB, no forwards, 30 min timeout, output inherited, the
    /// project's binaries, the kernel and all known images, the default cache, no progress.
    pub fn builder() -> Self {
        Self {
            cpus: 2,
            mem_mib: 4096,
            forwards: Vec::new(),
            timeout: Duration::from_secs(1800),
            boot_timeout: Duration::from_secs(120),
            env: Vec::new(),
            output: Output::Inherit,
            binaries: Binaries::Auto,
            images: IMAGE_NAMES.iter().map(|s| (*s).to_owned()).collect(),
            files: Vec::new(),
            strip_debug: true,
            cache: None,
            progress: Progress::silent(),
            cancel: None,
            on_event: None,
            wedge_retries: 0,
        }
    }

    pub fn cpus(mut self, cpus: u32) -> Self {
        self.cpus = cpus.max(1);
        self
    }

    pub fn mem_mib(mut self, mem_mib: u32) -> Self {
        self.mem_mib = mem_mib.max(256);
        self
    }

    pub fn forward(mut self, forward: Forward) -> Self {
        self.forwards.push(forward);
        self
    }

    /// Kills the host VM if the whole run (preparation excluded) takes longer.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Kills and retries (once) a boot that has not reached `/init` after this long: TCG
    /// occasionally hangs a vCPU during kernel start-up.
    pub fn boot_timeout(mut self, timeout: Duration) -> Self {
        self.boot_timeout = timeout;
        self
    }

    /// Sets an environment variable for the command.
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    pub fn output(mut self, output: Output) -> Self {
        self.output = output;
        self
    }

    /// Runs the command again in a fresh host VM, up to `retries` times, when the host VM
    /// wedges ([`HostVmError::Unresponsive`]) — within the same overall timeout. Only for
    /// captured output (a streamed run's lines are already out) and for commands that may
    /// safely run twice, such as test scripts.
    pub fn retries_when_wedged(mut self, retries: u32) -> Self {
        self.wedge_retries = retries;
        self
    }

    /// Keeps the command's output in the outcome instead of streaming it.
    pub fn capture_output(self) -> Self {
        self.output(Output::Capture)
    }

    /// Copies exactly these binaries to `/opt/roost/bin` instead of the project's.
    pub fn binaries(mut self, binaries: Vec<PathBuf>) -> Self {
        self.binaries = Binaries::List(binaries);
        self
    }

    /// Whether to copy binaries without debug info (default: yes; panics inside then show
    /// function names without line numbers).
    pub fn strip_debug(mut self, strip: bool) -> Self {
        self.strip_debug = strip;
        self
    }

    /// Attaches these index names as disks (default: [`IMAGE_NAMES`]).
    pub fn images(mut self, names: Vec<String>) -> Self {
        self.images = names;
        self
    }

    /// Copies the host file `host` into the host VM at the absolute path `guest`.
    pub fn file(mut self, guest: impl Into<String>, host: impl Into<PathBuf>) -> Self {
        self.files.push((guest.into(), host.into()));
        self
    }

    pub fn cache(mut self, cache: Cache) -> Self {
        self.cache = Some(cache);
        self
    }

    /// Shows first-run downloads and builds.
    pub fn progress(mut self, progress: Progress) -> Self {
        self.progress = progress;
        self
    }

    /// Stops the run (QEMU killed, [`HostVmError::Cancelled`]) when `flag` becomes true.
    pub fn cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = Some(flag);
        self
    }

    /// Calls `sink` for each [`Event`] as it happens (e.g. to print the boot time).
    pub fn on_event(mut self, sink: impl FnMut(&Event) + Send + 'static) -> Self {
        self.on_event = Some(EventSink(Box::new(sink)));
        self
    }

    /// Boots the host VM, runs `command` (an argv, executed without shell parsing; use
    /// `sh -c '...'` for shell syntax) and returns its exit status.
    pub fn run<I, S>(self, command: I) -> Result<RunOutcome, HostVmError>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let started = Instant::now();
        let command: Vec<String> = command.into_iter().map(Into::into).collect();
        if command.is_empty() {
            return Err(HostVmError::NoCommand);
        }
        let cache = match &self.cache {
            Some(cache) => cache.clone(),
            None => Cache::from_env()?,
        };
        let kernel = HostKernel::ensure(&cache, &self.progress)?;
        let base = BaseInitramfs::ensure(&cache, &kernel, &self.progress)?;

        let index = ArtefactIndex::new(&cache);
        let mut attached = Vec::new();
        let files: Vec<_> = lookup(&index, KERNEL_NAME)?.into_iter().collect();
        attached.extend(files.iter().map(|a| a.name.clone()));
        let mut images = Vec::new();
        for name in &self.images {
            if let Some(artefact) = lookup(&index, name)? {
                let serial = format!("roost{}", images.len());
                let file = artefact.path.clone();
                attached.push(artefact.name.clone());
                images.push((AttachedImage { artefact, serial }, file));
            }
        }
        let binaries = match &self.binaries {
            Binaries::Auto => overlay::project_binaries(&overlay::binaries_dir()?)?,
            Binaries::List(list) => list.clone(),
        };

        let work = tempfile::Builder::new()
            .prefix("roost-hostvm-")
            .tempdir()
            .map_err(|source| HostVmError::Io {
                path: std::env::temp_dir(),
                source,
            })?;
        let overlay = Overlay {
            command,
            env: self.env.clone(),
            binaries,
            files,
            images: images.iter().map(|(i, _)| i.clone()).collect(),
            outside_cache_root: cache.root().to_owned(),
            extra_files: self.files.clone(),
            strip_debug: self.strip_debug,
        };
        let initrd = work.path().join("initrd.cpio");
        write_initrd(&base.cpio, &overlay, work.path(), &base.files, &initrd)?;
        tracing::debug!(binaries = ?overlay.binaries, ?attached, "host VM prepared");

        let endpoints = Endpoints::in_dir(work.path());
        let args = qemu::host_vm_args(&QemuConfig {
            cpus: self.cpus,
            mem_mib: self.mem_mib,
            kernel: &kernel.boot_image,
            initrd: &initrd,
            forwards: &self.forwards,
            images: &images,
            endpoints: &endpoints,
        });
        let wedge_retries = match self.output {
            Output::Capture => self.wedge_retries,
            Output::Inherit | Output::Lines(_) => 0,
        };
        let deadline = Instant::now() + self.timeout;
        let mut session = Session::new(self, endpoints, work.path().join("qemu.log"));
        let (mut boot_attempt, mut wedged_runs) = (1, 0);
        loop {
            match session.run(&args, started, deadline) {
                Err(HostVmError::BootHang { waited, .. }) if boot_attempt < BOOT_ATTEMPTS => {
                    tracing::warn!(
                        "the host VM kernel hung during boot ({waited:?} without /init); retrying"
                    );
                    boot_attempt += 1;
                }
                Err(HostVmError::Unresponsive {
                    silent_for, stage, ..
                }) if wedged_runs < wedge_retries => {
                    tracing::warn!(
                        "the host VM fell silent for {silent_for:?} at `{stage}`; running the command again in a fresh one"
                    );
                    wedged_runs += 1;
                    session.discard_captured();
                }
                result => {
                    return result.map(|outcome| RunOutcome {
                        attached,
                        wedged_runs,
                        ..outcome
                    });
                }
            }
        }
    }
}

/// Looks an artefact up; an artefact that was never built is simply absent.
fn lookup(
    index: &ArtefactIndex,
    name: &str,
) -> Result<Option<roost_images::Artefact>, HostVmError> {
    match index.lookup(name) {
        Ok(artefact) => Ok(Some(artefact)),
        Err(IndexError::NotBuilt { .. }) => Ok(None),
        Err(e @ IndexError::Vanished { .. }) => {
            tracing::warn!("{e}; not attaching it");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// The base archive followed by this run's archive, in one file (QEMU takes one initrd).
fn write_initrd(
    base: &Path,
    overlay: &Overlay,
    scratch: &Path,
    base_files: &std::collections::HashSet<String>,
    out: &Path,
) -> Result<(), HostVmError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| HostVmError::Io { path, source }
    };
    std::fs::copy(base, out).map_err(io(base))?;
    let manifest = overlay.manifest(scratch, base_files)?;
    let file = File::options().append(true).open(out).map_err(io(out))?;
    let mut writer = io::BufWriter::with_capacity(1 << 20, file);
    manifest.write(&mut writer)?;
    writer.flush().map_err(io(out))?;
    Ok(())
}

/// Installs handlers so SIGINT, SIGTERM and SIGHUP set the returned flag instead of killing
/// the process; pass it to [`HostVm::cancel_flag`] so QEMU is stopped and temp files removed.
pub fn cancel_on_signals() -> io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for signal in [
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, Arc::clone(&flag))?;
    }
    Ok(flag)
}

enum Message {
    Control(Control),
    ControlClosed,
}

/// QEMU runs of one prepared host VM (a second one only if the first hung during boot).
struct Session {
    vm: HostVm,
    endpoints: Endpoints,
    qemu_log: PathBuf,
    sink: Arc<Mutex<LineSink>>,
    captured: Arc<Mutex<(Vec<u8>, Vec<u8>)>>,
}

#[derive(Default)]
struct Progressed {
    boot: Option<BootTimes>,
    stage: String,
    ready_at: Option<Instant>,
    exit: Option<(i32, Instant)>,
    failed: Option<(String, String)>,
    /// When `/init` last said anything on the control port.
    heard_at: Option<Instant>,
}

impl Progressed {
    /// How long `/init` has been silent, while silence means a wedged host VM: after it first
    /// spoke and until the command exited (then the VM powers off, with its own grace).
    fn silence(&self, now: Instant) -> Option<Duration> {
        match (self.heard_at, self.exit, &self.failed) {
            (Some(heard_at), None, None) => Some(now.saturating_duration_since(heard_at)),
            _ => None,
        }
    }
}

impl Session {
    fn new(mut vm: HostVm, endpoints: Endpoints, qemu_log: PathBuf) -> Self {
        let captured = Arc::new(Mutex::new((Vec::new(), Vec::new())));
        let sink: LineSink = match std::mem::replace(&mut vm.output, Output::Capture) {
            Output::Inherit => Box::new(|line: OutputLine<'_>| {
                let result = match line.stream {
                    StreamKind::Stdout => writeln!(io::stdout().lock(), "{}", line.line),
                    StreamKind::Stderr => writeln!(io::stderr().lock(), "{}", line.line),
                };
                if let Err(e) = result {
                    tracing::debug!(error = %e, "cannot forward a line of output");
                }
            }),
            Output::Capture => {
                let captured = Arc::clone(&captured);
                Box::new(move |line: OutputLine<'_>| {
                    let mut buffers = captured.lock().expect("capture lock");
                    let buffer = match line.stream {
                        StreamKind::Stdout => &mut buffers.0,
                        StreamKind::Stderr => &mut buffers.1,
                    };
                    buffer.extend_from_slice(line.line.as_bytes());
                    buffer.push(b'\n');
                })
            }
            Output::Lines(sink) => sink,
        };
        Self {
            vm,
            endpoints,
            qemu_log,
            sink: Arc::new(Mutex::new(sink)),
            captured,
        }
    }

    /// The last [`OUTPUT_TAIL`] lines the command printed so far (captured runs only).
    fn captured_tail(&self) -> String {
        let buffers = self.captured.lock().unwrap_or_else(|p| p.into_inner());
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&buffers.0),
            String::from_utf8_lossy(&buffers.1)
        );
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(OUTPUT_TAIL)..].join("\n")
    }

    /// Forgets what an abandoned run printed.
    fn discard_captured(&self) {
        let mut buffers = self.captured.lock().unwrap_or_else(|p| p.into_inner());
        buffers.0.clear();
        buffers.1.clear();
    }

    fn run(
        &mut self,
        args: &[std::ffi::OsString],
        started: Instant,
        deadline: Instant,
    ) -> Result<RunOutcome, HostVmError> {
        let qemu_started = Instant::now();
        let mut qemu = QemuProcess::spawn(args, &self.qemu_log).map_err(HostVmError::QemuSpawn)?;
        let [control, stdout, stderr] = self.connect(&mut qemu)?;
        let pumps = [
            pump(
                stdout,
                StreamKind::Stdout,
                Arc::clone(&self.sink),
                qemu_started,
            ),
            pump(
                stderr,
                StreamKind::Stderr,
                Arc::clone(&self.sink),
                qemu_started,
            ),
        ];
        let (tx, rx) = mpsc::channel();
        let control_reader = std::thread::spawn(move || {
            for line in BufReader::new(control).lines() {
                let Ok(line) = line else { break };
                match protocol::parse(&line) {
                    Some(message) => {
                        if tx.send(Message::Control(message)).is_err() {
                            break;
                        }
                    }
                    None => tracing::debug!(line, "unexpected control line"),
                }
            }
            let _ = tx.send(Message::ControlClosed);
        });

        let mut state = Progressed {
            stage: "boot".to_owned(),
            ..Progressed::default()
        };
        let status = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Message::Control(message)) => self.handle(message, &mut state, qemu_started),
                Ok(Message::ControlClosed)
                | Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {}
            }
            if let Some(status) = qemu.try_wait().map_err(|source| HostVmError::Io {
                path: self.qemu_log.clone(),
                source,
            })? {
                break status;
            }
            if self
                .vm
                .cancel
                .as_ref()
                .is_some_and(|c| c.load(Ordering::SeqCst))
            {
                let _ = qemu.kill();
                return Err(HostVmError::Cancelled);
            }
            let now = Instant::now();
            if let Some(silent_for) = state.silence(now)
                && silent_for >= SILENCE_LIMIT
            {
                let _ = qemu.kill();
                return Err(HostVmError::Unresponsive {
                    silent_for,
                    stage: state.stage.clone(),
                    output: self.captured_tail(),
                    console: tail(&self.endpoints.console_log, CONSOLE_TAIL),
                });
            }
            if state.boot.is_none() && now >= qemu_started + self.vm.boot_timeout {
                let _ = qemu.kill();
                return Err(HostVmError::BootHang {
                    waited: self.vm.boot_timeout,
                    console: tail(&self.endpoints.console_log, CONSOLE_TAIL),
                });
            }
            let limit = match state.exit.or(state.failed.as_ref().map(|_| (0, now))) {
                Some((_, at)) => deadline.min(at + POWER_OFF_GRACE),
                None => deadline,
            };
            if now >= limit {
                if state.exit.is_some() {
                    tracing::warn!("the host VM did not power off after the command; killing QEMU");
                    break qemu.kill().map_err(|source| HostVmError::Io {
                        path: self.qemu_log.clone(),
                        source,
                    })?;
                }
                let _ = qemu.kill();
                if state.failed.is_none() {
                    return Err(HostVmError::Timeout {
                        limit: self.vm.timeout,
                        stage: state.stage.clone(),
                        output: self.captured_tail(),
                        console: tail(&self.endpoints.console_log, CONSOLE_TAIL),
                    });
                }
                break qemu.kill().map_err(|source| HostVmError::Io {
                    path: self.qemu_log.clone(),
                    source,
                })?;
            }
        };
        // QEMU is gone: the sockets are closed, so the pumps reach EOF after the last byte.
        for pump in pumps {
            let _ = pump.join();
        }
        let _ = control_reader.join();
        while let Ok(Message::Control(message)) = rx.try_recv() {
            self.handle(message, &mut state, qemu_started);
        }

        if let Some((stage, message)) = state.failed {
            return Err(HostVmError::Setup {
                stage,
                message,
                console: tail(&self.endpoints.console_log, CONSOLE_TAIL),
            });
        }
        let (Some((exit_code, exited_at)), Some(boot), Some(ready_at)) =
            (state.exit, state.boot, state.ready_at)
        else {
            return Err(HostVmError::Stopped {
                status: status.to_string(),
                stage: state.stage,
                qemu_log: tail(&self.qemu_log, 20),
                console: tail(&self.endpoints.console_log, CONSOLE_TAIL),
            });
        };
        let (stdout, stderr) = std::mem::take(&mut *self.captured.lock().expect("capture lock"));
        Ok(RunOutcome {
            exit_code,
            boot,
            ready_after: ready_at - qemu_started,
            command_time: exited_at - ready_at,
            total: started.elapsed(),
            stdout,
            stderr,
            attached: Vec::new(),
            wedged_runs: 0,
        })
    }

    fn handle(&mut self, message: Control, state: &mut Progressed, qemu_started: Instant) {
        let since_start = qemu_started.elapsed();
        state.heard_at = Some(Instant::now());
        let event = match message {
            Control::Alive => None,
            Control::Init {
                uptime_at_init,
                uptime_now,
            } => {
                let behind = Duration::from_secs_f64((uptime_now - uptime_at_init).max(0.0));
                let boot = BootTimes {
                    qemu_to_init: since_start.saturating_sub(behind),
                    kernel_uptime_at_init: Duration::from_secs_f64(uptime_at_init),
                };
                state.boot = Some(boot);
                Some(Event::Booted(boot))
            }
            Control::Stage(name) => {
                state.stage.clone_from(&name);
                Some(Event::Stage { name, since_start })
            }
            Control::Fail { stage, message } => {
                state.failed = Some((stage, message));
                None
            }
            Control::Ready { .. } => {
                state.stage = "command".to_owned();
                state.ready_at = Some(Instant::now());
                Some(Event::CommandStarted { since_start })
            }
            Control::Exit(code) => {
                state.exit = Some((code, Instant::now()));
                None
            }
        };
        if let (Some(event), Some(sink)) = (event, self.vm.on_event.as_mut()) {
            (sink.0)(&event);
        }
    }

    /// Connects to QEMU's three socket chardevs once QEMU has created them.
    fn connect(&self, qemu: &mut QemuProcess) -> Result<[UnixStream; 3], HostVmError> {
        let started = Instant::now();
        let paths = [
            &self.endpoints.control,
            &self.endpoints.stdout,
            &self.endpoints.stderr,
        ];
        let mut streams = Vec::new();
        for path in paths {
            loop {
                match UnixStream::connect(path) {
                    Ok(stream) => {
                        streams.push(stream);
                        break;
                    }
                    Err(_) if started.elapsed() < SOCKET_WAIT => {
                        if qemu.try_wait().ok().flatten().is_some() {
                            return Err(HostVmError::QemuSockets {
                                waited: started.elapsed(),
                                qemu_log: tail(&self.qemu_log, 20),
                            });
                        }
                        std::thread::sleep(Duration::from_millis(10));
                    }
                    Err(_) => {
                        return Err(HostVmError::QemuSockets {
                            waited: SOCKET_WAIT,
                            qemu_log: tail(&self.qemu_log, 20),
                        });
                    }
                }
            }
        }
        streams.try_into().map_err(|_| HostVmError::QemuSockets {
            waited: SOCKET_WAIT,
            qemu_log: String::new(),
        })
    }
}

/// Reads `stream` to EOF, handing each line to `sink` as soon as it is complete.
fn pump(
    stream: UnixStream,
    kind: StreamKind,
    sink: Arc<Mutex<LineSink>>,
    qemu_started: Instant,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line);
                    let text = text.strip_suffix('\n').unwrap_or(&text);
                    let mut sink = sink.lock().expect("output lock");
                    (sink)(OutputLine {
                        stream: kind,
                        line: text,
                        since_start: qemu_started.elapsed(),
                    });
                }
            }
        }
    })
}

/// The last `lines` lines of a log file (carriage returns dropped), or a note if unreadable.
fn tail(path: &Path, lines: usize) -> String {
    let mut text = Vec::new();
    if let Err(e) = File::open(path).and_then(|mut f| f.read_to_end(&mut text)) {
        return format!("(cannot read {}: {e})", path.display());
    }
    let text = String::from_utf8_lossy(&text).replace('\r', "");
    let mut last: VecDeque<&str> = VecDeque::with_capacity(lines);
    for line in text.lines() {
        if last.len() == lines {
            last.pop_front();
        }
        last.push_back(line);
    }
    if last.is_empty() {
        return "(empty)".to_owned();
    }
    last.into_iter().collect::<Vec<_>>().join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_keeps_the_last_lines_without_carriage_returns() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, "a\r\nb\r\nc\r\n").unwrap();
        assert_eq!(tail(&path, 2), "b\nc");
        assert_eq!(tail(&path, 10), "a\nb\nc");
        std::fs::write(&path, "").unwrap();
        assert_eq!(tail(&path, 2), "(empty)");
        assert!(tail(&dir.path().join("none"), 2).starts_with("(cannot read"));
    }

    #[test]
    fn silence_counts_from_the_last_control_line_until_the_command_ends() {
        let start = Instant::now();
        let later = start + Duration::from_secs(61);
        let mut state = Progressed::default();
        assert_eq!(
            state.silence(later),
            None,
            "nothing heard yet: the boot timeout applies"
        );
        state.heard_at = Some(start);
        assert_eq!(state.silence(later), Some(Duration::from_secs(61)));
        state.exit = Some((0, start));
        assert_eq!(
            state.silence(later),
            None,
            "after the exit the power-off grace applies"
        );
        state.exit = None;
        state.failed = Some(("kvm".into(), "no /dev/kvm".into()));
        assert_eq!(state.silence(later), None);
    }

    #[test]
    fn empty_command_is_refused_before_any_work() {
        let err = HostVm::builder().run(Vec::<String>::new()).unwrap_err();
        assert!(matches!(err, HostVmError::NoCommand));
    }
}
