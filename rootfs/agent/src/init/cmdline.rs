//! The kernel command line (`/proc/cmdline`): `key=value` and bare words, double quotes
//! around values with spaces, and everything after `--` belonging to init's argv.

/// The parsed kernel command line.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<(String, Option<String>)>,
}

impl KernelCmdline {
    /// Reads the running kernel's command line; empty if /proc is not mounted.
    pub fn read() -> Self {
        std::fs::read_to_string("/proc/cmdline")
            .map(|text| Self::parse(&text))
            .unwrap_or_default()
    }

    pub fn parse(text: &str) -> Self {
        let mut params = Vec::new();
        for word in split_words(text) {
            if word == "--" {
                break;
            }
            match word.split_once('=') {
                Some((key, value)) => params.push((key.to_owned(), Some(value.to_owned()))),
                None => params.push((word, None)),
            }
        }
        Self { params }
    }

    /// Whether `key` appears, as a bare word or with a value.
    pub fn has(&self, key: &str) -> bool {
        self.params.iter().any(|(k, _)| k == key)
    }

    /// The value of the last `key=value` (as the kernel does, the last one wins).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .and_then(|(_, v)| v.as_deref())
    }
}

/// Splits on whitespace outside double quotes and drops the quotes.
fn split_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut started = false;
    for c in text.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                started = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_and_flags() {
        let cmdline = KernelCmdline::parse(
            "console=ttyS0 reboot=t panic=-1 root=/dev/vda ro roost.hostname=test1\n",
        );
        assert_eq!(cmdline.get("roost.hostname"), Some("test1"));
        assert_eq!(cmdline.get("root"), Some("/dev/vda"));
        assert_eq!(cmdline.get("ro"), None);
        assert!(cmdline.has("ro") && cmdline.has("root") && !cmdline.has("rw"));
        assert_eq!(cmdline.get("missing"), None);
    }

    #[test]
    fn last_value_wins_and_values_may_contain_equals() {
        let cmdline = KernelCmdline::parse("a=1 a=2 opts=x=y");
        assert_eq!(cmdline.get("a"), Some("2"));
        assert_eq!(cmdline.get("opts"), Some("x=y"));
    }

    #[test]
    fn quotes_and_double_dash() {
        let cmdline = KernelCmdline::parse(r#"msg="hello  world" roost.hostname="" -- a=b"#);
        assert_eq!(cmdline.get("msg"), Some("hello  world"));
        assert_eq!(cmdline.get("roost.hostname"), Some(""));
        assert_eq!(cmdline.get("a"), None);
        assert_eq!(KernelCmdline::parse("   "), KernelCmdline::default());
    }
}
