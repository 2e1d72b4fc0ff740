//! The image recipe: files from `rootfs/image/` embedded at compile time (so the built tool
//! does not need the source tree), and the constants that shape every image. All of it feeds
//! the cache keys.

use super::ImageName;

/// Bump when the build steps change in a way the embedded files do not show.
pub(crate) const TREE_RECIPE_VERSION: &str = "1";
/// Bump when the image packing (not the tree) changes in a way the embedded files do not show.
pub(crate) const IMAGE_RECIPE_VERSION: &str = "1";

/// Debian release every image is built from.
pub(crate) const SUITE: &str = "bookworm";
pub(crate) const COMPONENT: &str = "main";
pub(crate) const ARCH: &str = "amd64";
pub(crate) const VARIANT: &str = "minbase";

/// Timestamp every file in the image is clamped to (2023-06-10, Debian 12's release day), and
/// the creation time recorded in the ext4 superblock.
pub(crate) const SOURCE_DATE_EPOCH: u64 = 1_686_355_200;

/// Free space left in each image for the sandbox's user, beyond the installed tree.
pub(crate) const HEADROOM_BYTES: u64 = 1 << 30;

pub(crate) const CONFIGURE_SH: &str = include_str!("../../../image/configure.sh");
const BASE_PACKAGES: &str = include_str!("../../../image/base/packages");
const BASE_VERIFY: &str = include_str!("../../../image/base/verify.sh");
const CI_PACKAGES: &str = include_str!("../../../image/code-interpreter/packages");
const CI_VERIFY: &str = include_str!("../../../image/code-interpreter/verify.sh");

/// The image whose tree `image`'s tree is built on, if any.
pub(crate) fn parent(image: ImageName) -> Option<ImageName> {
    match image {
        ImageName::Base => None,
        ImageName::CodeInterpreter => Some(ImageName::Base),
    }
}

/// The packages `image` adds to its parent's tree (all of them for a root image).
pub(crate) fn own_packages(image: ImageName) -> Vec<&'static str> {
    let list = match image {
        ImageName::Base => BASE_PACKAGES,
        ImageName::CodeInterpreter => CI_PACKAGES,
    };
    parse_package_list(list).collect()
}

/// Every package named for `image` and its ancestors, without duplicates.
#[cfg(test)]
fn packages(image: ImageName) -> Vec<&'static str> {
    let mut names = parent(image).map(packages).unwrap_or_default();
    for name in own_packages(image) {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
}

/// The smoke tests run inside the finished tree, in order, as `(name, script)`.
pub(crate) fn verify_scripts(image: ImageName) -> Vec<(&'static str, &'static str)> {
    match image {
        ImageName::Base => vec![("base", BASE_VERIFY)],
        ImageName::CodeInterpreter => {
            vec![("base", BASE_VERIFY), ("code-interpreter", CI_VERIFY)]
        }
    }
}

fn parse_package_list(text: &str) -> impl Iterator<Item = &str> {
    text.lines().filter_map(|line| {
        let name = line.split('#').next().unwrap_or_default().trim();
        (!name.is_empty()).then_some(name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn package_lists_skip_comments_and_blank_lines() {
        let names: Vec<_> = parse_package_list("# c\nbash\n\n  git  # vcs\n#x\n").collect();
        assert_eq!(names, ["bash", "git"]);
    }

    #[test]
    fn code_interpreter_is_base_plus_jupyter_and_data_science() {
        let base = packages(ImageName::Base);
        let ci = packages(ImageName::CodeInterpreter);
        for name in [
            "bash",
            "python3",
            "python3-pip",
            "git",
            "curl",
            "sudo",
            "ca-certificates",
        ] {
            assert!(base.contains(&name), "{name} missing from base");
        }
        assert!(base.iter().all(|name| ci.contains(name)));
        for name in [
            "python3-ipykernel",
            "python3-jupyter-client",
            "python3-numpy",
        ] {
            assert!(ci.contains(&name) && !base.contains(&name), "{name}");
        }
        assert!(base.iter().all(|n| {
            n.chars()
                .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
        }));
    }
}
