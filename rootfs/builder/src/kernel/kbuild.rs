//! The build steps in a scratch directory: unpack, configure, verify the configuration,
//! compile, check and publish.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::config::{KconfigText, verify};
use super::inputs::{Inputs, SOURCE_PACKAGE};
use super::{ARCH, BUILD_STEPS_FILE, KernelError, RECIPE_VERSION, elf, io_error};
use crate::progress::Task;
use crate::run::run_logged;

/// One build in a scratch directory.
pub(super) struct Build<'a> {
    pub inputs: &'a Inputs,
    pub fragment: &'a KconfigText,
    pub task: &'a Task,
    pub log: &'a Path,
    pub work: &'a Path,
}

impl Build<'_> {
    pub fn run(&self, staging: &Path, estimated_steps: u64) -> Result<(), KernelError> {
        let source = self.unpack()?;

        self.task.phase("configuring (tinyconfig + microvm.config)");
        let fragment_path = self.work.join("microvm.config");
        fs::write(&fragment_path, &self.inputs.fragment).map_err(io_error(&fragment_path))?;
        self.make(&source, "make tinyconfig", &["tinyconfig"], |_| {})?;
        let mut merge = self.kbuild_command("scripts/kconfig/merge_config.sh", &source);
        merge.args(["-m", ".config"]).arg(&fragment_path);
        self.step("merge_config.sh", &mut merge, |_| {})?;
        self.make(&source, "make olddefconfig", &["olddefconfig"], |_| {})?;
        let config_path = source.join(".config");
        let final_text = fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
        let final_config =
            KconfigText::parse(&final_text).map_err(|source| KernelError::FinalConfig {
                path: config_path.clone(),
                source,
            })?;
        let mismatches = verify(self.fragment, &final_config);
        if !mismatches.is_empty() {
            // Keep the generated config for the reader: the work dir is about to vanish.
            let kept = self.log.with_extension("config");
            fs::copy(&config_path, &kept).map_err(io_error(&kept))?;
            return Err(KernelError::OptionsDidNotStick {
                mismatches,
                config: kept,
            });
        }

        let jobs = std::thread::available_parallelism().map_or(1, usize::from);
        self.task
            .phase(&format!("compiling vmlinux (make -j{jobs})"));
        self.task.set_total(estimated_steps);
        let steps = AtomicU64::new(0);
        let jobs_arg = format!("-j{jobs}");
        self.make(
            &source,
            "make vmlinux",
            &[jobs_arg.as_str(), "vmlinux"],
            |line| {
                if is_kbuild_step(line) {
                    let done = steps.fetch_add(1, Ordering::Relaxed) + 1;
                    if done > estimated_steps {
                        self.task.set_total(done);
                    }
                    self.task.advance(1);
                }
            },
        )?;

        self.task.phase("publishing vmlinux");
        let vmlinux = source.join("vmlinux");
        let image = fs::read(&vmlinux).map_err(io_error(&vmlinux))?;
        elf::check_pvh_vmlinux(&image).map_err(|source| KernelError::NotBootable {
            path: vmlinux.clone(),
            source,
        })?;
        let published = staging.join("vmlinux");
        fs::write(&published, &image).map_err(io_error(&published))?;
        let published_config = staging.join("config");
        fs::write(&published_config, final_text).map_err(io_error(&published_config))?;
        let steps_path = staging.join(BUILD_STEPS_FILE);
        fs::write(&steps_path, format!("{}\n", steps.into_inner()))
            .map_err(io_error(&steps_path))?;
        Ok(())
    }

    /// Unpacks the tarball into the work dir and returns the source tree's root.
    fn unpack(&self) -> Result<PathBuf, KernelError> {
        self.task.phase(&format!(
            "unpacking {} {}",
            SOURCE_PACKAGE, self.inputs.source_version
        ));
        let tree = self.work.join("src");
        fs::create_dir(&tree).map_err(io_error(&tree))?;
        let mut tar = Command::new("tar");
        tar.arg("-xf")
            .arg(&self.inputs.tarball)
            .arg("-C")
            .arg(&tree);
        self.step("unpack source", &mut tar, |_| {})?;
        let mut roots = fs::read_dir(&tree)
            .map_err(io_error(&tree))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(io_error(&tree))?;
        match (roots.pop(), roots.is_empty()) {
            (Some(root), true) if root.path().is_dir() => Ok(root.path()),
            _ => Err(KernelError::UnexpectedTarball {
                tarball: self.inputs.tarball.clone(),
            }),
        }
    }

    /// A command run in the source tree with a deterministic kbuild environment.
    fn kbuild_command(&self, program: &str, source: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(source)
            .env("ARCH", ARCH)
            // Same inputs, same bytes: no user, host or date in the image.
            .env("KBUILD_BUILD_USER", "roost")
            .env("KBUILD_BUILD_HOST", "roost")
            .env("KBUILD_BUILD_VERSION", "1")
            .env(
                "KBUILD_BUILD_TIMESTAMP",
                format!("roost kernel recipe {RECIPE_VERSION}"),
            )
            // A caller running under make or cargo must not leak its jobserver or flags.
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL")
            .env_remove("CROSS_COMPILE");
        command
    }

    fn make(
        &self,
        source: &Path,
        step: &'static str,
        args: &[&str],
        on_line: impl FnMut(&str) + Send,
    ) -> Result<(), KernelError> {
        let mut make = self.kbuild_command("make", source);
        make.args(args);
        self.step(step, &mut make, on_line)
    }

    fn step(
        &self,
        step: &'static str,
        command: &mut Command,
        on_line: impl FnMut(&str) + Send,
    ) -> Result<(), KernelError> {
        run_logged(command, self.task, self.log, on_line)
            .map_err(|source| KernelError::Step { step, source })
    }
}

/// Whether a line of make output is one kbuild step (`  CC      kernel/fork.o`).
fn is_kbuild_step(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("  ") else {
        return false;
    };
    let mut words = rest.split_whitespace();
    let tag_ok = words.next().is_some_and(|tag| {
        tag.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && tag.bytes().next().is_some_and(|b| b.is_ascii_uppercase())
    });
    tag_ok && words.next().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kbuild_step_lines_are_counted_and_others_are_not() {
        for step in [
            "  CC      kernel/fork.o",
            "  AS      arch/x86/entry/entry_64.o",
            "  LD      vmlinux.o",
        ] {
            assert!(is_kbuild_step(step), "{step}");
        }
        for other in [
            "make[1]: Entering directory",
            "  ",
            "CC kernel/fork.o",
            "  CC",
            "  warning: x",
        ] {
            assert!(!is_kbuild_step(other), "{other}");
        }
    }
}
