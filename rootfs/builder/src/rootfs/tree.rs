//! Cache level 1: the Debian tree of an image, packed as `tree.tar` (numeric owners, modes,
//! device nodes and xattrs preserved) with its package manifest beside it.
//!
//! `base` is debootstrapped. `code-interpreter` starts from `base`'s tree and adds its packages
//! with apt inside a chroot: debootstrap's resolver takes the first alternative of every
//! dependency and ignores virtual packages, which fails on the Jupyter stack; apt resolves it
//! properly (Recommends off) and the debootstrap is not repeated.

use std::fs;
use std::path::{Path, PathBuf};

use super::recipe::{self, ARCH, COMPONENT, SUITE, TREE_RECIPE_VERSION, VARIANT};
use super::{ImageName, MANIFEST_FILE, RootfsError, TREE_KIND, capture, tool, unmount_below};
use crate::cache::{Cache, CacheKey, CacheKeyBuilder, Origin};
use crate::progress::Task;
use crate::run::run_logged;

/// File name of the packed tree inside its cache entry.
pub(crate) const TREE_TAR: &str = "tree.tar";

/// The tree's key: everything debootstrap and apt are given except the mirror, which serves
/// the same suite wherever it is (delete `rootfs-tree/` or bump the recipe version to refresh).
pub(crate) fn key(image: ImageName) -> CacheKey {
    let mut builder = CacheKeyBuilder::new(TREE_KIND);
    builder.add("recipe", TREE_RECIPE_VERSION.as_bytes());
    match recipe::parent(image) {
        None => builder
            .add("suite", SUITE.as_bytes())
            .add("component", COMPONENT.as_bytes())
            .add("arch", ARCH.as_bytes())
            .add("variant", VARIANT.as_bytes()),
        Some(parent) => builder.add("parent", key(parent).as_str().as_bytes()),
    };
    builder
        .add(
            "packages",
            recipe::own_packages(image).join("\n").as_bytes(),
        )
        .finish()
}

/// The cache entry directory of the tree (holding [`TREE_TAR`] and the manifest), built
/// first (with its parent's) if absent.
pub(crate) fn ensure(
    cache: &Cache,
    task: &Task,
    image: ImageName,
    key: &CacheKey,
) -> Result<PathBuf, RootfsError> {
    let parent = match recipe::parent(image) {
        Some(parent) => Some(ensure(cache, task, parent, &self::key(parent))?),
        None => None,
    };
    let log = super::log_path(cache, &format!("rootfs-tree-{image}"), key)?;
    let (dir, origin) = cache.entry(TREE_KIND, key).get_or_build(|staging| {
        let root = staging.join("root");
        let result = match &parent {
            None => debootstrap(task, image, &root, &log),
            Some(parent_dir) => extend(task, image, parent_dir, &root, &log),
        };
        // debootstrap and the apt step mount /proc (and more) inside the tree; a failed run
        // may leave them there, and the cache's clean-up must never walk into them.
        unmount_below(&root);
        result?;
        finish(task, &root, staging, &log)
    })?;
    if origin == Origin::Cached {
        task.phase(&format!("{image} tree {key} from cache"));
    }
    Ok(dir)
}

fn debootstrap(task: &Task, image: ImageName, root: &Path, log: &Path) -> Result<(), RootfsError> {
    let mirror = super::mirror::find_mirror(Path::new("/etc/apt"), SUITE, COMPONENT).ok_or(
        RootfsError::NoMirror {
            suite: SUITE,
            component: COMPONENT,
        },
    )?;
    let packages = recipe::own_packages(image);
    task.phase(&format!(
        "debootstrap {SUITE} ({VARIANT} + {} packages)",
        packages.len()
    ));
    run_logged(
        tool("debootstrap")
            .arg(format!("--variant={VARIANT}"))
            .arg(format!("--arch={ARCH}"))
            .arg(format!("--components={COMPONENT}"))
            .arg(format!("--include={}", packages.join(",")))
            .arg(SUITE)
            .arg(root)
            .arg(&mirror)
            .env("LC_ALL", "C"),
        task,
        log,
        |_| {},
    )
    .map_err(|source| {
        // debootstrap's own detailed log is inside the tree, which the cache deletes.
        let inner = root.join("debootstrap/debootstrap.log");
        if let Ok(text) = fs::read(&inner) {
            let _ = fs::write(log.with_extension("debootstrap.log"), text);
        }
        RootfsError::Step {
            step: "debootstrap".into(),
            source,
        }
    })
}

/// Unpacks the parent's tree into `root` and installs this image's packages with apt.
fn extend(
    task: &Task,
    image: ImageName,
    parent_dir: &Path,
    root: &Path,
    log: &Path,
) -> Result<(), RootfsError> {
    fs::create_dir_all(root).map_err(RootfsError::io(root))?;
    task.phase("unpacking the parent tree");
    run_logged(
        &mut unpack_command(&parent_dir.join(TREE_TAR), root),
        task,
        log,
        |_| {},
    )
    .map_err(RootfsError::step("unpacking the parent tree"))?;
    // Name resolution for apt inside the chroot: the build host's, removed by configure.sh.
    let resolv = root.join("etc/resolv.conf");
    fs::copy("/etc/resolv.conf", &resolv).map_err(RootfsError::io(&resolv))?;
    let proc = root.join("proc");
    run_logged(
        tool("mount").args(["-t", "proc", "proc"]).arg(&proc),
        task,
        log,
        |_| {},
    )
    .map_err(RootfsError::step("mounting /proc in the tree"))?;
    let apt = |args: &[&str]| {
        let mut command = tool("chroot");
        command
            .arg(root)
            .args(["apt-get", "-y", "-o", "APT::Install-Recommends=false"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("LC_ALL", "C");
        command
    };
    task.phase("apt-get update");
    run_logged(&mut apt(&["update"]), task, log, |_| {})
        .map_err(RootfsError::step("apt-get update in the tree"))?;
    let packages = recipe::own_packages(image);
    task.phase(&format!("apt-get install ({} packages)", packages.len()));
    let mut install = apt(&["install"]);
    install.args(&packages);
    run_logged(&mut install, task, log, |_| {})
        .map_err(RootfsError::step(format!("apt-get install for {image}")))?;
    run_logged(&mut apt(&["clean"]), task, log, |_| {})
        .map_err(RootfsError::step("apt-get clean in the tree"))
}

/// Records the manifest, drops downloaded packages and packs the tree.
fn finish(task: &Task, root: &Path, staging: &Path, log: &Path) -> Result<(), RootfsError> {
    task.phase("recording package versions");
    let manifest = capture(
        tool("dpkg-query")
            .arg(format!(
                "--admindir={}",
                root.join("var/lib/dpkg").display()
            ))
            .arg("--show")
            .arg("--showformat=${Package}\t${Version}\t${Architecture}\n"),
    )?;
    let mut lines: Vec<&str> = manifest.lines().collect();
    lines.sort_unstable();
    let manifest_path = staging.join(MANIFEST_FILE);
    fs::write(&manifest_path, lines.join("\n") + "\n").map_err(RootfsError::io(&manifest_path))?;

    let archives = root.join("var/cache/apt/archives");
    for entry in fs::read_dir(&archives)
        .map_err(RootfsError::io(&archives))?
        .flatten()
    {
        if entry.path().extension().is_some_and(|ext| ext == "deb") {
            fs::remove_file(entry.path()).map_err(RootfsError::io(&entry.path()))?;
        }
    }

    task.phase("packing the tree");
    run_logged(
        tool("tar")
            .args([
                "--create",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=*",
                "--file",
            ])
            .arg(staging.join(TREE_TAR))
            .arg("--directory")
            .arg(root)
            .arg("."),
        task,
        log,
        |_| {},
    )
    .map_err(RootfsError::step("packing the tree"))?;
    let log_copy = staging.join("build.log");
    fs::copy(log, &log_copy).map_err(RootfsError::io(&log_copy))?;
    fs::remove_dir_all(root).map_err(RootfsError::io(root))
}

/// `tar` unpacking `tar_file` into `dest` with owners, modes and xattrs as recorded.
pub(crate) fn unpack_command(tar_file: &Path, dest: &Path) -> std::process::Command {
    let mut command = tool("tar");
    command
        .args([
            "--extract",
            "--numeric-owner",
            "--same-permissions",
            "--xattrs",
        ])
        .args(["--xattrs-include=*", "--file"])
        .arg(tar_file)
        .arg("--directory")
        .arg(dest);
    command
}
