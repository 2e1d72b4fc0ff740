//! The guest's hostname: `roost.hostname=NAME` on the kernel command line if valid, else
//! `/etc/hostname`, else [`FALLBACK`].

use super::cmdline::KernelCmdline;

/// Kernel command-line key carrying the hostname.
pub const CMDLINE_KEY: &str = "roost.hostname";
/// Used when neither the command line nor /etc/hostname gives a valid name.
pub const FALLBACK: &str = "roost";
/// Linux's HOST_NAME_MAX.
const MAX_LEN: usize = 64;
const MAX_LABEL_LEN: usize = 63;

/// Why a hostname was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostnameError {
    #[error("hostname is empty")]
    Empty,
    #[error("hostname is {0} bytes long; at most {MAX_LEN} allowed")]
    TooLong(usize),
    #[error(
        "hostname label `{0}` must be 1-{MAX_LABEL_LEN} characters, not starting or ending with `-`"
    )]
    BadLabel(String),
    #[error("hostname contains {0:?}; only letters, digits, `-` and `.` are allowed")]
    BadChar(char),
}

/// Checks `name` is an RFC 1123 hostname that Linux accepts.
pub fn validate(name: &str) -> Result<&str, HostnameError> {
    if name.is_empty() {
        return Err(HostnameError::Empty);
    }
    if name.len() > MAX_LEN {
        return Err(HostnameError::TooLong(name.len()));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '.'))
    {
        return Err(HostnameError::BadChar(c));
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > MAX_LABEL_LEN
            || label.starts_with('-')
            || label.ends_with('-')
        {
            return Err(HostnameError::BadLabel(label.to_owned()));
        }
    }
    Ok(name)
}

/// Where the chosen hostname came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    Cmdline,
    EtcHostname,
    Fallback,
}

/// Picks the hostname. Returns it, where it came from, and a warning for each refused
/// candidate (to print once on the console).
pub fn choose(
    cmdline: &KernelCmdline,
    etc_hostname: Option<&str>,
) -> (String, Source, Vec<String>) {
    let mut warnings = Vec::new();
    if let Some(name) = cmdline.get(CMDLINE_KEY) {
        match validate(name) {
            Ok(name) => return (name.to_owned(), Source::Cmdline, warnings),
            Err(e) => warnings.push(format!("ignoring {CMDLINE_KEY}={name:?}: {e}")),
        }
    }
    if let Some(text) = etc_hostname {
        let name = text.lines().next().unwrap_or_default().trim();
        match validate(name) {
            Ok(name) => return (name.to_owned(), Source::EtcHostname, warnings),
            Err(e) => warnings.push(format!("ignoring /etc/hostname: {e}")),
        }
    }
    (FALLBACK.to_owned(), Source::Fallback, warnings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_hostnames() {
        for name in ["a", "test1", "sandbox-1.example", "A0-b", &"x".repeat(63)] {
            assert_eq!(validate(name), Ok(name));
        }
        let long_ok = format!("{}.{}", "a".repeat(31), "b".repeat(32));
        assert_eq!(long_ok.len(), 64);
        assert!(validate(&long_ok).is_ok());
    }

    #[test]
    fn invalid_hostnames() {
        assert_eq!(validate(""), Err(HostnameError::Empty));
        assert_eq!(validate(&"a.".repeat(40)), Err(HostnameError::TooLong(80)));
        assert_eq!(validate("has space"), Err(HostnameError::BadChar(' ')));
        assert_eq!(validate("under_score"), Err(HostnameError::BadChar('_')));
        assert_eq!(validate("évian"), Err(HostnameError::BadChar('é')));
        assert_eq!(validate("a/b"), Err(HostnameError::BadChar('/')));
        assert!(matches!(validate("-lead"), Err(HostnameError::BadLabel(_))));
        assert!(matches!(
            validate("trail-"),
            Err(HostnameError::BadLabel(_))
        ));
        assert!(matches!(validate("a..b"), Err(HostnameError::BadLabel(_))));
        assert!(matches!(
            validate(&"x".repeat(64)),
            Err(HostnameError::BadLabel(_))
        ));
    }

    #[test]
    fn choose_prefers_a_valid_cmdline_name_then_etc_hostname() {
        let cmdline = KernelCmdline::parse("roost.hostname=test1");
        assert_eq!(choose(&cmdline, Some("roost\n")).0, "test1");
        assert_eq!(choose(&cmdline, Some("roost\n")).1, Source::Cmdline);

        let bad = KernelCmdline::parse("roost.hostname=bad_name");
        let (name, source, warnings) = choose(&bad, Some("fromfile\n"));
        assert_eq!((name.as_str(), source), ("fromfile", Source::EtcHostname));
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("bad_name"), "{warnings:?}");

        let none = KernelCmdline::default();
        assert_eq!(choose(&none, None).1, Source::Fallback);
        let (name, source, warnings) = choose(&none, Some("  \n"));
        assert_eq!(
            (name.as_str(), source, warnings.len()),
            (FALLBACK, Source::Fallback, 1)
        );
    }
}
