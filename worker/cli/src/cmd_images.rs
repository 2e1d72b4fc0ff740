//! `roost images build|list`: the guest kernel and root filesystem images, from the cache when
//! their inputs are unchanged.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use roost_images::rootfs::ImageName;
use roost_images::{ArtefactIndex, Built, Cache, Origin, Progress, kernel, rootfs};
use roost_worker::host_check::human_bytes;

#[derive(clap::Subcommand, Debug)]
pub enum ImagesCommand {
    /// Build (or take from the cache) the guest kernel and root filesystem images.
    ///
    /// With no selection, builds the kernel and every image.
    Build(BuildArgs),
    /// Show the artefacts that are built and where they are.
    List,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Build the guest kernel.
    #[arg(long)]
    kernel: bool,
    /// Build this root filesystem image (repeatable): base, code-interpreter.
    #[arg(long = "image", value_name = "NAME")]
    images: Vec<ImageName>,
    /// The roost-agent binary to install as /sbin/init (default: next to this `roost`).
    #[arg(long, value_name = "PATH", env = "ROOST_AGENT_BIN")]
    agent: Option<PathBuf>,
}

pub fn run(command: ImagesCommand) -> anyhow::Result<i32> {
    let cache = Cache::from_env().context("opening the artefact cache")?;
    match command {
        ImagesCommand::Build(args) => build(&cache, args),
        ImagesCommand::List => list(&cache),
    }
}

/// What `images build` was asked for, with "nothing selected" meaning everything.
fn selection(args: &BuildArgs) -> (bool, Vec<ImageName>) {
    if !args.kernel && args.images.is_empty() {
        return (true, ImageName::ALL.to_vec());
    }
    let mut images = args.images.clone();
    images.dedup();
    (args.kernel, images)
}

fn build(cache: &Cache, args: BuildArgs) -> anyhow::Result<i32> {
    let (want_kernel, images) = selection(&args);
    let agent = if images.is_empty() {
        None
    } else {
        Some(agent_binary(args.agent.as_deref())?)
    };
    let progress = Progress::to_stderr();
    let started = Instant::now();
    let mut built = Vec::new();
    if want_kernel {
        built.push(kernel::build(cache, &progress).context("building the guest kernel")?);
    }
    for image in images {
        let agent = agent
            .as_deref()
            .expect("agent resolved when images are selected");
        built.push(
            rootfs::build(cache, &progress, image, agent)
                .with_context(|| format!("building the `{image}` root filesystem"))?,
        );
    }
    print!("{}", summary(&built));
    println!(
        "done in {:.1} s; cache: {}",
        started.elapsed().as_secs_f64(),
        cache.root().display()
    );
    Ok(0)
}

fn agent_binary(explicit: Option<&Path>) -> anyhow::Result<PathBuf> {
    let path = match explicit {
        Some(path) => path.to_owned(),
        None => std::env::current_exe()
            .context("locating the roost binary")?
            .with_file_name("roost-agent"),
    };
    if !path.is_file() {
        bail!(
            "roost-agent binary not found at {}: build it with `cargo build --release -p roost-agent` \
             (or pass --agent PATH)",
            path.display()
        );
    }
    Ok(path)
}

fn summary(built: &[Built]) -> String {
    let mut out = format!(
        "{:<26} {:<7} {:>10} {:>10} {:>9}  {}\n",
        "artefact", "origin", "size", "on disk", "time", "path"
    );
    for b in built {
        let origin = match b.origin {
            Origin::Built => "built",
            Origin::Cached => "cached",
        };
        let on_disk = allocated_bytes(&b.artefact.path)
            .map(human_bytes)
            .unwrap_or_else(|| "?".into());
        out.push_str(&format!(
            "{:<26} {:<7} {:>10} {:>10} {:>8.1}s  {}\n",
            b.artefact.name,
            origin,
            human_bytes(b.artefact.size_bytes),
            on_disk,
            b.duration.as_secs_f64(),
            b.artefact.path.display()
        ));
    }
    out
}

/// Bytes actually allocated on disk (images are sparse).
fn allocated_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
}

fn list(cache: &Cache) -> anyhow::Result<i32> {
    let index = ArtefactIndex::new(cache);
    let names = std::iter::once(kernel::INDEX_NAME.to_owned())
        .chain(ImageName::ALL.iter().map(|i| i.index_name().to_owned()));
    for name in names {
        match index.lookup(&name) {
            Ok(a) => println!(
                "{:<26} {:>10}  {}  key {}",
                a.name,
                human_bytes(a.size_bytes),
                a.path.display(),
                &a.key[..16.min(a.key.len())]
            ),
            Err(e) => println!("{name:<26} not built: {e}"),
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        images: ImagesCommand,
    }

    fn parse(args: &[&str]) -> BuildArgs {
        let cli =
            Cli::try_parse_from(std::iter::once("images").chain(args.iter().copied())).unwrap();
        match cli.images {
            ImagesCommand::Build(args) => args,
            ImagesCommand::List => panic!("parsed as list"),
        }
    }

    #[test]
    fn no_selection_means_everything() {
        let (kernel, images) = selection(&parse(&["build"]));
        assert!(kernel);
        assert_eq!(images, ImageName::ALL);
    }

    #[test]
    fn explicit_selection_is_respected() {
        let (kernel, images) = selection(&parse(&["build", "--image", "base"]));
        assert!(!kernel);
        assert_eq!(images, [ImageName::Base]);
        let (kernel, images) = selection(&parse(&["build", "--kernel"]));
        assert!(kernel);
        assert!(images.is_empty());
    }

    #[test]
    fn unknown_image_names_are_refused() {
        let err = Cli::try_parse_from(["images", "build", "--image", "nope"]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn missing_agent_binary_says_how_to_build_it() {
        let err = agent_binary(Some(Path::new("/nonexistent/roost-agent"))).unwrap_err();
        assert!(
            err.to_string()
                .contains("cargo build --release -p roost-agent"),
            "{err}"
        );
    }
}
