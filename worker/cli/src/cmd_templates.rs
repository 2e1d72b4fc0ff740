//! `roost templates build|list`: template snapshots (a booted, agent-ready VM per guest image)
//! that sandboxes are restored from, cached by the hash of their inputs like the images.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;
use roost_images::{ArtefactIndex, Cache, Origin};
use roost_worker::host_check::human_bytes;
use roost_worker::template::{self, TemplateName, TemplateSpec};
use roost_worker::vm_handle::{default_runtime_root, default_vmm_binary, ensure_runtime_root};

use crate::cmd_sandbox::SeccompArg;

#[derive(clap::Subcommand, Debug)]
pub enum TemplatesCommand {
    /// Build (or take from the cache) template snapshots: boot the image, wait for the agent,
    /// run its ready check, snapshot. With no --image, builds every template.
    Build(BuildArgs),
    /// Show the templates that are built and where they are.
    List,
}

#[derive(clap::Args, Debug)]
pub struct BuildArgs {
    /// Template to build (repeatable): base, code-interpreter.
    #[arg(long = "image", value_name = "NAME")]
    images: Vec<TemplateName>,
    /// Seconds the boot, start command and ready check may take together.
    #[arg(long, default_value_t = 300, value_name = "SECS")]
    ready_timeout: u64,
    /// Directory for the build VM's runtime directory [default: as `roost sandbox run`].
    #[arg(long, value_name = "DIR")]
    runtime_root: Option<PathBuf>,
    /// The VMM's seccomp mode.
    #[arg(long, value_enum, default_value_t = SeccompArg::Enforce)]
    seccomp: SeccompArg,
    /// Build the flavour with a network device (`template-<name>-net`), which a worker with
    /// sandbox networking (`roost serve worker --net`) offers. Needs root: the build VM's tap
    /// lives in a network namespace of its own.
    #[arg(long)]
    network: bool,
}

pub fn run(command: TemplatesCommand) -> anyhow::Result<i32> {
    let cache = Cache::from_env().context("opening the artefact cache")?;
    match command {
        TemplatesCommand::Build(args) => build(&cache, args),
        TemplatesCommand::List => list(&cache),
    }
}

fn build(cache: &Cache, args: BuildArgs) -> anyhow::Result<i32> {
    let mut names = if args.images.is_empty() {
        TemplateName::ALL.to_vec()
    } else {
        args.images.clone()
    };
    names.dedup();
    let root = args
        .runtime_root
        .clone()
        .unwrap_or_else(default_runtime_root);
    ensure_runtime_root(&root)?;
    let index = ArtefactIndex::new(cache);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let started = Instant::now();
    for name in names {
        let mut spec = TemplateSpec::for_image(name, &index, default_vmm_binary(), root.clone())
            .with_context(|| format!("the `{name}` template's inputs"))?;
        spec.ready_timeout = Duration::from_secs(args.ready_timeout);
        spec.seccomp = args.seccomp.mode();
        spec.network = args.network;
        let built = runtime
            .block_on(template::build(cache, &spec))
            .with_context(|| format!("building the `{name}` template"))?;
        let origin = match built.origin {
            Origin::Built => "built",
            Origin::Cached => "cached",
        };
        println!(
            "{:<26} {:<7} {:>10} {:>8.1}s  {}",
            built.artefact.name,
            origin,
            human_bytes(built.artefact.size_bytes),
            built.duration.as_secs_f64(),
            built.artefact.path.display()
        );
    }
    println!(
        "done in {:.1} s; cache: {}",
        started.elapsed().as_secs_f64(),
        cache.root().display()
    );
    Ok(0)
}

fn list(cache: &Cache) -> anyhow::Result<i32> {
    let index = ArtefactIndex::new(cache);
    let flavours = TemplateName::ALL
        .into_iter()
        .flat_map(|name| [(name, false), (name, true)]);
    for (name, network) in flavours {
        let index_name = name.index_name_for(network);
        match template::lookup(&index, name, network) {
            Ok(t) => {
                let detail = t.meta.map_or_else(String::new, |m| {
                    format!(
                        "  {} vCPU, {} MiB, built in {} ms",
                        m.cpus, m.mem_mib, m.build_ms
                    )
                });
                println!(
                    "{:<30} {}  key {}{detail}",
                    index_name,
                    t.snapshot_dir.display(),
                    &t.key[..16.min(t.key.len())]
                );
            }
            Err(e) => println!("{index_name:<30} not built: {e}"),
        }
    }
    Ok(0)
}
