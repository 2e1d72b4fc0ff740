//! Shared libraries of a host binary, from `ldd`, so that dynamically linked programs (QEMU,
//! the project's binaries) run inside the host VM.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Errors resolving shared libraries.
#[derive(Debug, thiserror::Error)]
pub enum LddError {
    #[error("cannot run `ldd` on {binary} (is libc-bin installed?)")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("`ldd {binary}` failed: {message}")]
    Failed { binary: PathBuf, message: String },
}

/// The absolute paths of the shared libraries (and the dynamic loader) `binary` needs; empty
/// for a static binary.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, LddError> {
    let output = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|source| LddError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !output.status.success() {
        if is_static(&stdout) || is_static(&stderr) {
            return Ok(Vec::new());
        }
        return Err(LddError::Failed {
            binary: binary.to_owned(),
            message: format!("{}{}", stdout.trim(), stderr.trim()),
        });
    }
    parse(&stdout).map_err(|message| LddError::Failed {
        binary: binary.to_owned(),
        message,
    })
}

fn is_static(text: &str) -> bool {
    text.contains("not a dynamic executable") || text.contains("statically linked")
}

/// Parses `ldd` output into library paths.
pub fn parse(output: &str) -> Result<Vec<PathBuf>, String> {
    let mut libs = Vec::new();
    for line in output.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if is_static(line) {
            continue;
        }
        let path = match line.split_once(" => ") {
            Some((name, rest)) => {
                let target = rest.split_whitespace().next().unwrap_or("");
                if target == "not" {
                    return Err(format!("library {name} not found"));
                }
                target
            }
            // The loader (`/lib64/ld-linux-x86-64.so.2 (0x...)`) or the vDSO (no path).
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        } else if !path.starts_with("linux-vdso") && !path.starts_with("linux-gate") {
            return Err(format!("cannot read ldd line `{line}`"));
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_libraries_loader_and_vdso() {
        let out = "\tlinux-vdso.so.1 (0x00007ffd)\n\
\tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f12)\n\
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f12)\n\
\t/lib64/ld-linux-x86-64.so.2 (0x00007f12)\n";
        let libs = parse(out).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn missing_library_is_an_error() {
        let err = parse("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.contains("libfoo.so.1"), "{err}");
    }

    #[test]
    fn static_binary_has_no_libraries() {
        assert!(parse("\tstatically linked\n").unwrap().is_empty());
        assert!(
            shared_libraries(Path::new("/bin/busybox"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn real_dynamic_binary_needs_libc() {
        let libs = shared_libraries(Path::new("/bin/sh")).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
    }
}
