//! Where the serial console's bytes go: a log file, optionally this process's stdout, and a
//! line scanner that spots the guest kernel's panic line.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::sync::Arc;

use crate::exit::ExitCoordinator;

/// What the kernel prints first when it panics.
pub const PANIC_MARKER: &str = "Kernel panic - not syncing";
/// Longest console line kept for scanning; longer lines are scanned in pieces.
const MAX_LINE: usize = 1024;

/// The serial device's output: never fails towards the guest (a full disk must not stall it).
#[derive(Debug)]
pub struct ConsoleSink {
    log: Option<LineWriter<File>>,
    stdout: bool,
    line: Vec<u8>,
    exits: Arc<ExitCoordinator>,
    write_failed: bool,
}

impl ConsoleSink {
    pub fn new(log: Option<File>, stdout: bool, exits: Arc<ExitCoordinator>) -> Self {
        Self {
            log: log.map(LineWriter::new),
            stdout,
            line: Vec::with_capacity(MAX_LINE),
            exits,
            write_failed: false,
        }
    }

    fn scan(&mut self, byte: u8) {
        if byte != b'\n' && self.line.len() < MAX_LINE {
            self.line.push(byte);
            return;
        }
        let text = String::from_utf8_lossy(&self.line);
        if let Some(pos) = text.find(PANIC_MARKER) {
            self.exits.note_panic(text[pos..].trim_end().to_owned());
        }
        self.line.clear();
        if byte != b'\n' {
            self.line.push(byte);
        }
    }
}

impl Write for ConsoleSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &byte in buf {
            self.scan(byte);
        }
        if let Some(log) = &mut self.log
            && let Err(e) = log.write_all(buf)
            && !self.write_failed
        {
            self.write_failed = true;
            tracing::warn!(error = %e, "serial log write failed; further console output is lost");
        }
        if self.stdout {
            let mut out = std::io::stdout().lock();
            let _ = out.write_all(buf);
            if buf.contains(&b'\n') {
                let _ = out.flush();
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if let Some(log) = &mut self.log {
            let _ = log.flush();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::{ShutdownReason, VmExit};

    #[test]
    fn panic_line_is_reported_and_everything_is_logged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serial.log");
        let exits = Arc::new(ExitCoordinator::new());
        let mut sink = ConsoleSink::new(Some(File::create(&path).unwrap()), false, exits.clone());
        sink.write_all(b"[    0.5] ok\n[    0.6] Kernel panic - not syncing: VFS: Unable")
            .unwrap();
        sink.write_all(b" to mount root fs\n").unwrap();
        sink.flush().unwrap();
        exits.request(VmExit::Shutdown(ShutdownReason::TripleFault));
        assert_eq!(
            exits.wait(),
            VmExit::Panic {
                line: "Kernel panic - not syncing: VFS: Unable to mount root fs".into()
            }
        );
        let logged = std::fs::read_to_string(&path).unwrap();
        assert!(logged.ends_with("root fs\n"), "{logged}");
    }

    #[test]
    fn ordinary_output_is_not_a_panic() {
        let exits = Arc::new(ExitCoordinator::new());
        let mut sink = ConsoleSink::new(None, false, exits.clone());
        sink.write_all(&vec![b'x'; 5000]).unwrap();
        sink.write_all(b"\nroost-agent: ready\n").unwrap();
        exits.request(VmExit::Stopped);
        assert_eq!(exits.wait(), VmExit::Stopped);
    }
}
