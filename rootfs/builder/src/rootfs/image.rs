//! Cache level 2: unpacks the tree, installs roost-agent as `/sbin/init`, runs the smoke tests
//! and `configure.sh` on it, and packs it into a sparse ext4 image with `mkfs.ext4 -d`.
//!
//! Deterministic where cheap: timestamps are clamped to [`SOURCE_DATE_EPOCH`], the superblock
//! time is faked to it, and the filesystem UUID and directory hash seed derive from the key.
//! Inode numbering follows the unpacked tree's directory order and is not pinned.

use std::fs::{self, File};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

use super::recipe::{self, CONFIGURE_SH, HEADROOM_BYTES, IMAGE_RECIPE_VERSION, SOURCE_DATE_EPOCH};
use super::tree::{TREE_TAR, unpack_command};
use super::{
    IMAGE_FILE, IMAGE_KIND, ImageName, MANIFEST_FILE, META_FILE, RootfsError, capture, tool,
};
use crate::cache::{CacheKey, CacheKeyBuilder, sha256_file};
use crate::progress::Task;
use crate::run::run_logged;

const MIB: u64 = 1 << 20;
/// ext4 block size.
const BLOCK_SIZE: u64 = 4096;
/// Where the agent lives in the image; `/sbin/init` (= `/usr/sbin/init`) links to it.
const AGENT_IN_IMAGE: &str = "usr/sbin/roost-agent";

/// The image's key: the tree's key plus everything applied to the tree afterwards.
pub(crate) fn key(
    image: ImageName,
    tree_key: &CacheKey,
    agent_bin: &Path,
) -> Result<CacheKey, RootfsError> {
    let mut builder = CacheKeyBuilder::new(IMAGE_KIND);
    builder
        .add("recipe", IMAGE_RECIPE_VERSION.as_bytes())
        .add("image", image.as_str().as_bytes())
        .add("tree", tree_key.as_str().as_bytes())
        .add("configure.sh", CONFIGURE_SH.as_bytes())
        .add(
            "source-date-epoch",
            SOURCE_DATE_EPOCH.to_string().as_bytes(),
        )
        .add("headroom", HEADROOM_BYTES.to_string().as_bytes());
    for (name, script) in recipe::verify_scripts(image) {
        builder.add(&format!("verify-{name}"), script.as_bytes());
    }
    builder.add("agent-sha256", sha256_file(agent_bin)?.as_bytes());
    Ok(builder.finish())
}

/// Builds the image of `image` from the tree entry `tree_dir` into `staging`.
pub(crate) fn build(
    task: &Task,
    image: ImageName,
    tree_dir: &Path,
    agent_bin: &Path,
    key: &CacheKey,
    staging: &Path,
    log: &Path,
) -> Result<(), RootfsError> {
    let work = staging.join("work");
    let root = work.join("root");
    fs::create_dir_all(&root).map_err(RootfsError::io(&root))?;

    task.phase("unpacking the tree");
    run_logged(
        &mut unpack_command(&tree_dir.join(TREE_TAR), &root),
        task,
        log,
        |_| {},
    )
    .map_err(RootfsError::step("unpacking the tree"))?;

    task.phase("installing roost-agent as /sbin/init");
    let agent = root.join(AGENT_IN_IMAGE);
    fs::copy(agent_bin, &agent).map_err(RootfsError::io(&agent))?;
    fs::set_permissions(&agent, fs::Permissions::from_mode(0o755))
        .map_err(RootfsError::io(&agent))?;
    run_logged(
        tool("chroot")
            .arg(&root)
            .arg(Path::new("/").join(AGENT_IN_IMAGE))
            .arg("version"),
        task,
        log,
        |_| {},
    )
    .map_err(RootfsError::step(
        "running roost-agent inside the tree (is it built for glibc <= 2.36?)",
    ))?;

    for (name, script) in recipe::verify_scripts(image) {
        task.phase(&format!("smoke test: {name}"));
        let inside = format!("tmp/roost-verify-{name}.sh");
        let path = root.join(&inside);
        fs::write(&path, script).map_err(RootfsError::io(&path))?;
        let result = run_logged(
            tool("chroot")
                .arg(&root)
                .args(["/bin/sh", "-eu"])
                .arg(Path::new("/").join(&inside))
                .env("LC_ALL", "C"),
            task,
            log,
            |_| {},
        );
        fs::remove_file(&path).map_err(RootfsError::io(&path))?;
        result.map_err(RootfsError::step(format!(
            "smoke test rootfs/image/{name}/verify.sh"
        )))?;
    }

    task.phase("configuring (rootfs/image/configure.sh)");
    let script = work.join("configure.sh");
    fs::write(&script, CONFIGURE_SH).map_err(RootfsError::io(&script))?;
    run_logged(
        tool("sh")
            .arg("-eu")
            .arg(&script)
            .arg(&root)
            .arg(image.as_str())
            .env("SOURCE_DATE_EPOCH", SOURCE_DATE_EPOCH.to_string()),
        task,
        log,
        |_| {},
    )
    .map_err(RootfsError::step("rootfs/image/configure.sh"))?;

    task.phase("packing ext4 image");
    let tree_bytes = allocated_tree_bytes(&root)?;
    let size = image_size(tree_bytes);
    let path = staging.join(IMAGE_FILE);
    let file = File::create(&path).map_err(RootfsError::io(&path))?;
    file.set_len(size).map_err(RootfsError::io(&path))?;
    drop(file);
    let uuid = uuid_from_key(key);
    run_logged(
        tool("mkfs.ext4")
            .args(["-F", "-q", "-t", "ext4", "-m", "0", "-b"])
            .arg(BLOCK_SIZE.to_string())
            .arg("-L")
            .arg(format!("roost-{image}"))
            .arg("-U")
            .arg(&uuid)
            .arg("-E")
            .arg(format!("hash_seed={uuid},root_owner=0:0"))
            .arg("-d")
            .arg(&root)
            .arg(&path)
            .env("E2FSPROGS_FAKE_TIME", SOURCE_DATE_EPOCH.to_string()),
        task,
        log,
        |_| {},
    )
    .map_err(RootfsError::step("mkfs.ext4"))?;
    run_logged(
        tool("e2fsck").args(["-f", "-n"]).arg(&path),
        task,
        log,
        |_| {},
    )
    .map_err(RootfsError::step("e2fsck of the new image"))?;
    let free_bytes = free_bytes(&path)?;
    if free_bytes < HEADROOM_BYTES {
        return Err(RootfsError::TooSmall {
            free_bytes,
            wanted_bytes: HEADROOM_BYTES,
        });
    }

    let manifest = staging.join(MANIFEST_FILE);
    fs::copy(tree_dir.join(MANIFEST_FILE), &manifest).map_err(RootfsError::io(&manifest))?;
    let meta = serde_json::json!({
        "image": image.as_str(),
        "key": key.as_str(),
        "tree_bytes": tree_bytes,
        "image_bytes": size,
        "free_bytes": free_bytes,
        "filesystem_uuid": uuid,
        "source_date_epoch": SOURCE_DATE_EPOCH,
    });
    let log_copy = staging.join("build.log");
    fs::copy(log, &log_copy).map_err(RootfsError::io(&log_copy))?;
    let meta_path = staging.join(META_FILE);
    fs::write(&meta_path, format!("{meta:#}\n")).map_err(RootfsError::io(&meta_path))?;
    fs::remove_dir_all(&work).map_err(RootfsError::io(&work))
}

/// Image size for a tree occupying `tree_bytes`: the tree plus 10% for ext4 metadata
/// (extents, directories, inode tables), 128 MiB for the journal and reserved groups, and
/// [`HEADROOM_BYTES`] free for the user, rounded up to 64 MiB.
fn image_size(tree_bytes: u64) -> u64 {
    let raw = tree_bytes + tree_bytes / 10 + 128 * MIB + HEADROOM_BYTES;
    raw.div_ceil(64 * MIB) * 64 * MIB
}

/// Bytes the files under `root` occupy (hard links counted once per name: an overestimate).
fn allocated_tree_bytes(root: &Path) -> Result<u64, RootfsError> {
    let mut total = 0;
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).map_err(RootfsError::io(&dir))? {
            let entry = entry.map_err(RootfsError::io(&dir))?;
            let meta =
                fs::symlink_metadata(entry.path()).map_err(RootfsError::io(&entry.path()))?;
            total += (meta.blocks() * 512).max(BLOCK_SIZE);
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(total)
}

/// Free bytes in the ext4 image, from its superblock.
fn free_bytes(image: &Path) -> Result<u64, RootfsError> {
    let text = capture(tool("dumpe2fs").arg("-h").arg(image))?;
    let field = |name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|value| value.trim().parse::<u64>().ok())
    };
    match (field("Free blocks:"), field("Block size:")) {
        (Some(blocks), Some(size)) => Ok(blocks * size),
        _ => Err(RootfsError::BadOutput {
            command: format!("dumpe2fs -h {}", image.display()),
        }),
    }
}

/// A UUID-formatted string made of the key's first 128 bits.
fn uuid_from_key(key: &CacheKey) -> String {
    let hex = &key.as_str()[..32];
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_leaves_headroom_and_is_aligned() {
        let size = image_size(700 * MIB);
        assert!(size >= 700 * MIB + HEADROOM_BYTES + 128 * MIB);
        assert_eq!(size % (64 * MIB), 0);
        assert!(image_size(1) > HEADROOM_BYTES);
    }

    #[test]
    fn uuid_is_derived_from_the_key() {
        let key = CacheKeyBuilder::new("x").finish();
        let uuid = uuid_from_key(&key);
        assert_eq!(uuid.len(), 36);
        assert_eq!(uuid.replace('-', ""), key.as_str()[..32]);
    }
}
