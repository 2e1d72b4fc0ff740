//! Finds the Debian mirror to debootstrap from: `$ROOST_DEBIAN_MIRROR`, else the build host's
//! apt configuration (the first entry serving `bookworm` with the `main` component, from
//! deb822 `*.sources` files and one-line `sources.list` entries). No mirror is built in.

use std::fs;
use std::path::{Path, PathBuf};

/// Environment variable that overrides the mirror (e.g. `http://HOST/debian`).
pub const MIRROR_ENV: &str = "ROOST_DEBIAN_MIRROR";

/// The apt configuration files read, in order.
pub(crate) fn apt_source_files(apt_dir: &Path) -> Vec<PathBuf> {
    let mut files = vec![apt_dir.join("sources.list")];
    let mut parts: Vec<PathBuf> = fs::read_dir(apt_dir.join("sources.list.d"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext == "sources" || ext == "list")
        })
        .collect();
    parts.sort();
    files.extend(parts);
    files
}

/// The mirror to use: the override if set, else the first matching apt entry under `apt_dir`.
pub(crate) fn find_mirror(apt_dir: &Path, suite: &str, component: &str) -> Option<String> {
    if let Some(url) = std::env::var(MIRROR_ENV)
        .ok()
        .filter(|v| !v.trim().is_empty())
    {
        return Some(url.trim().to_owned());
    }
    apt_source_files(apt_dir).iter().find_map(|path| {
        let text = fs::read_to_string(path).ok()?;
        if path.extension().is_some_and(|ext| ext == "sources") {
            find_in_deb822(&text, suite, component)
        } else {
            find_in_one_line(&text, suite, component)
        }
    })
}

/// The first URI of a deb822 stanza with `Types: deb` whose suites and components match.
fn find_in_deb822(text: &str, suite: &str, component: &str) -> Option<String> {
    text.split("\n\n").find_map(|stanza| {
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in stanza.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            if line.starts_with([' ', '\t']) {
                if let Some((_, value)) = fields.last_mut() {
                    value.push(' ');
                    value.push_str(line.trim());
                }
            } else if let Some((key, value)) = line.split_once(':') {
                fields.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
            }
        }
        let field = |name: &str| {
            fields
                .iter()
                .find(|(key, _)| key == name)
                .map(|(_, value)| value.as_str())
        };
        let has = |name: &str, word: &str| {
            field(name).is_some_and(|value| value.split_whitespace().any(|w| w == word))
        };
        let enabled = field("enabled").is_none_or(|value| !value.eq_ignore_ascii_case("no"));
        (enabled && has("types", "deb") && has("suites", suite) && has("components", component))
            .then(|| field("uris")?.split_whitespace().next().map(str::to_owned))
            .flatten()
    })
}

/// The URI of the first `deb [options] URI SUITE COMPONENT...` line that matches.
fn find_in_one_line(text: &str, suite: &str, component: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next()?.trim();
        let rest = line.strip_prefix("deb")?;
        if !rest.starts_with([' ', '\t']) {
            return None; // `deb-src`
        }
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('[') {
            Some(options) => options.split_once(']')?.1,
            None => rest,
        };
        let mut words = rest.split_whitespace();
        let uri = words.next()?;
        (words.next()? == suite && words.any(|w| w == component)).then(|| uri.to_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEB822: &str = "\
Types: deb-src
URIs: http://src.example/debian
Suites: bookworm
Components: main

Types: deb
# http://comment.example/archive
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main contrib

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
";

    #[test]
    fn deb822_picks_the_deb_stanza_with_suite_and_component() {
        assert_eq!(
            find_in_deb822(DEB822, "bookworm", "main").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(find_in_deb822(DEB822, "bookworm", "non-free"), None);
        assert_eq!(find_in_deb822(DEB822, "trixie", "main"), None);
    }

    #[test]
    fn deb822_skips_disabled_stanzas_and_joins_continuation_lines() {
        let text = "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\n\
                    Components: main\nEnabled: no\n\n\
                    Types: deb\nURIs:\n http://on.example/debian\nSuites: bookworm\n\
                    Components:\n contrib\n main\n";
        assert_eq!(
            find_in_deb822(text, "bookworm", "main").as_deref(),
            Some("http://on.example/debian")
        );
    }

    #[test]
    fn one_line_entries_with_options_and_comments() {
        let text = "# deb http://commented.example/debian bookworm main\n\
                    deb-src http://src.example/debian bookworm main\n\
                    deb http://other.example/debian bookworm-updates main\n\
                    deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main # x\n";
        assert_eq!(
            find_in_one_line(text, "bookworm", "main").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            find_in_one_line(
                "deb http://a.example/d bookworm contrib\n",
                "bookworm",
                "main"
            ),
            None
        );
    }

    #[test]
    fn apt_dir_files_are_read_in_order() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sources.list.d")).unwrap();
        fs::write(dir.path().join("sources.list.d/b.sources"), DEB822).unwrap();
        fs::write(
            dir.path().join("sources.list.d/a.list.disabled"),
            "deb http://x/ bookworm main",
        )
        .unwrap();
        let files = apt_source_files(dir.path());
        assert_eq!(files.len(), 2);
        // Without the override (tests must not depend on the environment; skip if it is set).
        if std::env::var_os(MIRROR_ENV).is_none() {
            assert_eq!(
                find_mirror(dir.path(), "bookworm", "main").as_deref(),
                Some("http://mirror.example/debian")
            );
        }
    }
}
