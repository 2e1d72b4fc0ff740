//! Progress output for long builds: a live spinner or bar on a terminal, and periodic plain
//! lines elsewhere (CI logs), so a multi-minute kernel build never looks hung.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often plain (non-terminal) output repeats the latest subprocess line.
const PLAIN_HEARTBEAT: Duration = Duration::from_secs(15);

/// Creates progress tasks. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Progress {
    multi: MultiProgress,
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Interactive,
    Plain,
    Silent,
}

impl Progress {
    /// Live bars when stderr is a terminal, plain lines otherwise.
    pub fn to_stderr() -> Self {
        let interactive = std::io::stderr().is_terminal() && std::env::var_os("CI").is_none();
        let mode = if interactive {
            Mode::Interactive
        } else {
            Mode::Plain
        };
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            mode,
        }
    }

    /// No output at all (tests).
    pub fn silent() -> Self {
        Self {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            mode: Mode::Silent,
        }
    }

    /// Starts a task labelled `name` (e.g. `kernel`, `rootfs base`).
    pub fn task(&self, name: &str) -> Task {
        let bar = match self.mode {
            Mode::Interactive => {
                let bar = self.multi.add(ProgressBar::new_spinner());
                bar.set_style(spinner_style());
                bar.enable_steady_tick(Duration::from_millis(120));
                bar
            }
            Mode::Plain | Mode::Silent => ProgressBar::hidden(),
        };
        bar.set_prefix(name.to_owned());
        let task = Task {
            name: name.to_owned(),
            bar,
            mode: self.mode,
            started: Instant::now(),
            last_plain: Mutex::new(Instant::now()),
        };
        task.say("started");
        task
    }
}

fn spinner_style() -> ProgressStyle {
    ProgressStyle::with_template("{spinner} {prefix:.bold} [{elapsed_precise}] {wide_msg}")
        .expect("static template is valid")
}

fn bar_style() -> ProgressStyle {
    ProgressStyle::with_template(
        "{spinner} {prefix:.bold} [{elapsed_precise}] {bar:30} {pos}/{len} {wide_msg}",
    )
    .expect("static template is valid")
}

/// One long-running step with its own line of progress.
#[derive(Debug)]
pub struct Task {
    name: String,
    bar: ProgressBar,
    mode: Mode,
    started: Instant,
    last_plain: Mutex<Instant>,
}

impl Task {
    fn say(&self, message: &str) {
        if self.mode == Mode::Plain {
            eprintln!(
                "[{} {:>4}s] {message}",
                self.name,
                self.started.elapsed().as_secs()
            );
        }
    }

    /// A new phase of the task ("extracting sources", "compiling").
    pub fn phase(&self, message: &str) {
        self.bar.set_message(message.to_owned());
        self.say(message);
        *self.last_plain.lock().expect("progress lock") = Instant::now();
    }

    /// A line of subprocess output: shown live on a terminal, sampled in plain mode.
    pub fn output_line(&self, line: &str) {
        let line = line.trim();
        if line.is_empty() {
            return;
        }
        self.bar.set_message(truncate(line, 100).to_owned());
        if self.mode == Mode::Plain {
            let mut last = self.last_plain.lock().expect("progress lock");
            if last.elapsed() >= PLAIN_HEARTBEAT {
                *last = Instant::now();
                drop(last);
                self.say(&format!("... {}", truncate(line, 100)));
            }
        }
    }

    /// Turns the spinner into a bar of `total` steps (e.g. objects to compile).
    pub fn set_total(&self, total: u64) {
        self.bar.set_length(total);
        self.bar.set_style(bar_style());
    }

    /// Advances the bar by `n` steps.
    pub fn advance(&self, n: u64) {
        self.bar.inc(n);
    }

    /// Time since the task started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Ends the task with a one-line outcome.
    pub fn finish(&self, outcome: &str) {
        self.say(outcome);
        if self.mode == Mode::Interactive {
            self.bar.set_style(
                ProgressStyle::with_template("✓ {prefix:.bold} {wide_msg}")
                    .expect("static template is valid"),
            );
        }
        self.bar.finish_with_message(outcome.to_owned());
    }
}

fn truncate(line: &str, max_chars: usize) -> &str {
    match line.char_indices().nth(max_chars) {
        Some((idx, _)) => &line[..idx],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("héllo", 2), "hé");
        assert_eq!(truncate("hi", 10), "hi");
    }

    #[test]
    fn silent_tasks_accept_every_call() {
        let task = Progress::silent().task("t");
        task.phase("p");
        task.output_line("line");
        task.set_total(3);
        task.advance(1);
        task.finish("done");
    }
}
