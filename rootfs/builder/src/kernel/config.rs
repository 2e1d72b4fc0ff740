//! Kconfig text: parsing the fragment and a final `.config`, and checking that every option the
//! fragment sets still holds after `make olddefconfig` (which silently drops options whose
//! dependencies are unmet, and ignores names that do not exist).

use std::collections::BTreeMap;
use std::fmt;

/// The value a Kconfig option has (or should have).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Setting {
    /// `CONFIG_X=y`
    Yes,
    /// `CONFIG_X=m`
    Module,
    /// `# CONFIG_X is not set` or `CONFIG_X=n`
    No,
    /// `CONFIG_X=<value>` for strings, numbers and hex, kept verbatim (quotes included).
    Value(String),
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Yes => f.write_str("y"),
            Self::Module => f.write_str("m"),
            Self::No => f.write_str("not set"),
            Self::Value(value) => f.write_str(value),
        }
    }
}

/// A line of Kconfig text that is neither an assignment, a `not set` marker nor a comment, or
/// an option assigned twice.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {problem}: `{text}`")]
pub struct SyntaxError {
    pub line: usize,
    pub problem: &'static str,
    pub text: String,
}

/// Options in the order they were assigned, keyed by their full `CONFIG_` name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KconfigText {
    options: BTreeMap<String, Setting>,
    order: Vec<String>,
}

impl KconfigText {
    /// Parses a fragment or a `.config`. Blank lines and `#` comments are skipped; assigning the
    /// same option twice is an error (in a fragment it is always a mistake).
    pub fn parse(text: &str) -> Result<Self, SyntaxError> {
        let mut parsed = Self::default();
        for (index, raw) in text.lines().enumerate() {
            let line = raw.trim();
            let error = |problem| SyntaxError {
                line: index + 1,
                problem,
                text: line.to_owned(),
            };
            let (name, setting) = if let Some(comment) = line.strip_prefix('#') {
                match comment.trim().strip_suffix(" is not set") {
                    Some(name) if name.starts_with("CONFIG_") => (name, Setting::No),
                    _ => continue,
                }
            } else if line.is_empty() {
                continue;
            } else {
                let (name, value) = line
                    .split_once('=')
                    .ok_or_else(|| error("expected CONFIG_X=value"))?;
                let setting = match value {
                    "y" => Setting::Yes,
                    "m" => Setting::Module,
                    "n" => Setting::No,
                    "" => return Err(error("empty value")),
                    other => Setting::Value(other.to_owned()),
                };
                (name, setting)
            };
            let valid_name = name.strip_prefix("CONFIG_").is_some_and(|rest| {
                !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
            });
            if !valid_name {
                return Err(error("not a CONFIG_ option name"));
            }
            if parsed.options.insert(name.to_owned(), setting).is_some() {
                return Err(error("option assigned twice"));
            }
            parsed.order.push(name.to_owned());
        }
        Ok(parsed)
    }

    /// The option's setting; an option the text does not mention is `None`.
    pub fn get(&self, name: &str) -> Option<&Setting> {
        self.options.get(name)
    }

    /// Options in the order the text assigns them.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Setting)> {
        self.order
            .iter()
            .map(|name| (name.as_str(), &self.options[name]))
    }

    /// Number of options assigned.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Whether no option is assigned.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

/// An option the fragment sets that the final configuration does not honour.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub name: String,
    pub wanted: Setting,
    /// `None` when the final `.config` does not mention the option at all: an unknown name
    /// (typo) or an option hidden by an unmet dependency.
    pub found: Option<Setting>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.found {
            Some(found) => write!(f, "{}: wanted {}, got {}", self.name, self.wanted, found),
            None => write!(
                f,
                "{}: wanted {}, absent (unknown option or unmet dependency)",
                self.name, self.wanted
            ),
        }
    }
}

/// Every option of `fragment` whose setting does not hold in `final_config`. An option the
/// fragment disables holds when the final configuration disables it or does not mention it.
pub fn verify(fragment: &KconfigText, final_config: &KconfigText) -> Vec<Mismatch> {
    fragment
        .iter()
        .filter_map(|(name, wanted)| {
            let found = final_config.get(name);
            let holds = match (wanted, found) {
                (Setting::No, None | Some(Setting::No)) => true,
                (wanted, Some(found)) => wanted == found,
                (_, None) => false,
            };
            (!holds).then(|| Mismatch {
                name: name.to_owned(),
                wanted: wanted.clone(),
                found: found.cloned(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_assignments_not_set_markers_and_comments() {
        let text = "# a comment\n\nCONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=\"-roost\"\n\
                    CONFIG_D=16\nCONFIG_E=m\nCONFIG_F=n\n  # indented comment\n";
        let parsed = KconfigText::parse(text).unwrap();
        assert_eq!(parsed.len(), 6);
        assert_eq!(parsed.get("CONFIG_A"), Some(&Setting::Yes));
        assert_eq!(parsed.get("CONFIG_B"), Some(&Setting::No));
        assert_eq!(
            parsed.get("CONFIG_C"),
            Some(&Setting::Value("\"-roost\"".into()))
        );
        assert_eq!(parsed.get("CONFIG_D"), Some(&Setting::Value("16".into())));
        assert_eq!(parsed.get("CONFIG_E"), Some(&Setting::Module));
        assert_eq!(parsed.get("CONFIG_F"), Some(&Setting::No));
        assert_eq!(parsed.get("CONFIG_G"), None);
        let names: Vec<_> = parsed.iter().map(|(name, _)| name).collect();
        assert_eq!(
            names,
            [
                "CONFIG_A", "CONFIG_B", "CONFIG_C", "CONFIG_D", "CONFIG_E", "CONFIG_F"
            ]
        );
    }

    #[test]
    fn rejects_malformed_lines_with_their_line_number() {
        let err = KconfigText::parse("CONFIG_A=y\nVIRTIO=y\n").unwrap_err();
        assert_eq!(err.line, 2);
        assert_eq!(err.problem, "not a CONFIG_ option name");
        assert_eq!(
            KconfigText::parse("CONFIG_A y").unwrap_err().problem,
            "expected CONFIG_X=value"
        );
        assert_eq!(
            KconfigText::parse("CONFIG_A=").unwrap_err().problem,
            "empty value"
        );
        assert_eq!(
            KconfigText::parse("CONFIG_=y").unwrap_err().problem,
            "not a CONFIG_ option name"
        );
        let twice = KconfigText::parse("CONFIG_A=y\n# CONFIG_A is not set\n").unwrap_err();
        assert_eq!((twice.line, twice.problem), (2, "option assigned twice"));
    }

    #[test]
    fn verify_accepts_a_config_that_honours_every_option() {
        let fragment =
            KconfigText::parse("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=16\nCONFIG_D=n\n")
                .unwrap();
        let final_config =
            KconfigText::parse("CONFIG_A=y\n# CONFIG_B is not set\nCONFIG_C=16\nCONFIG_OTHER=y\n")
                .unwrap();
        assert_eq!(verify(&fragment, &final_config), []);
    }

    #[test]
    fn verify_reports_every_option_that_did_not_stick() {
        let fragment = KconfigText::parse(
            "CONFIG_A=y\nCONFIG_TYPO=y\n# CONFIG_B is not set\nCONFIG_C=16\nCONFIG_D=y\n",
        )
        .unwrap();
        let final_config =
            KconfigText::parse("# CONFIG_A is not set\nCONFIG_B=y\nCONFIG_C=64\nCONFIG_D=m\n")
                .unwrap();
        let mismatches = verify(&fragment, &final_config);
        let shown: Vec<String> = mismatches.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "CONFIG_A: wanted y, got not set",
                "CONFIG_TYPO: wanted y, absent (unknown option or unmet dependency)",
                "CONFIG_B: wanted not set, got y",
                "CONFIG_C: wanted 16, got 64",
                "CONFIG_D: wanted y, got m",
            ]
        );
    }
}
