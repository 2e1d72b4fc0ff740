//! Per-execution environment variables: Python that sets them in the kernel before the cell and
//! puts the old values back after it, as E2B does.
//!
//! Both snippets run as separate silent executions (no history, no execution count, no output
//! to the client), so the cell's own line numbers and tracebacks are untouched. The previous
//! values are kept on the `os` module under one private name rather than in the user's
//! namespace. Keys and values go in as JSON string literals, which are valid Python string
//! literals, so no value can break out of its quotes.

use std::collections::BTreeMap;

/// Where the saved values live between the two snippets.
const SAVED: &str = "_roost_saved_environ";

/// Why a variable cannot be set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidEnvVar {
    #[error("environment variable names must not be empty")]
    EmptyName,
    #[error("environment variable name {0:?} contains `=` or a NUL byte")]
    BadName(String),
    #[error("the value of environment variable {0:?} contains a NUL byte")]
    BadValue(String),
}

/// Checks names and values the way `os.environ` would reject them, before any code runs.
pub fn validate(vars: &BTreeMap<String, String>) -> Result<(), InvalidEnvVar> {
    for (name, value) in vars {
        if name.is_empty() {
            return Err(InvalidEnvVar::EmptyName);
        }
        if name.contains(['=', '\0']) {
            return Err(InvalidEnvVar::BadName(name.clone()));
        }
        if value.contains('\0') {
            return Err(InvalidEnvVar::BadValue(name.clone()));
        }
    }
    Ok(())
}

/// Python that remembers the current values of `vars`' names and sets the new ones.
pub fn set_code(vars: &BTreeMap<String, String>) -> String {
    let names = python_list(vars.keys());
    let values = python_dict(vars);
    format!(
        "import os as _roost_os\n\
         setattr(_roost_os, {SAVED:?}, {{_k: _roost_os.environ.get(_k) for _k in {names}}})\n\
         _roost_os.environ.update({values})\n\
         del _roost_os\n"
    )
}

/// Python that sets `vars` for good (the sandbox's own variables).
pub fn set_permanently_code(vars: &BTreeMap<String, String>) -> String {
    format!(
        "import os as _roost_os\n_roost_os.environ.update({})\ndel _roost_os\n",
        python_dict(vars)
    )
}

/// Python that puts back what [`set_code`] saved: old values restored, new names removed.
pub fn restore_code() -> String {
    format!(
        "import os as _roost_os\n\
         for _roost_k, _roost_v in getattr(_roost_os, {SAVED:?}, {{}}).items():\n\
         \x20   if _roost_v is None:\n\
         \x20       _roost_os.environ.pop(_roost_k, None)\n\
         \x20   else:\n\
         \x20       _roost_os.environ[_roost_k] = _roost_v\n\
         if hasattr(_roost_os, {SAVED:?}):\n\
         \x20   delattr(_roost_os, {SAVED:?})\n\
         _roost_k = _roost_v = None\n\
         del _roost_os, _roost_k, _roost_v\n"
    )
}

fn python_str(text: &str) -> String {
    // A JSON string is a valid Python string literal (same escapes; never `\/` from serde).
    serde_json::Value::String(text.to_owned()).to_string()
}

fn python_list<'a>(items: impl Iterator<Item = &'a String>) -> String {
    let items: Vec<String> = items.map(|s| python_str(s)).collect();
    format!("[{}]", items.join(", "))
}

fn python_dict(vars: &BTreeMap<String, String>) -> String {
    let pairs: Vec<String> = vars
        .iter()
        .map(|(k, v)| format!("{}: {}", python_str(k), python_str(v)))
        .collect();
    format!("{{{}}}", pairs.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn values_are_quoted_so_they_cannot_escape() {
        let code = set_code(&vars(&[("A", "x'\"\n\\); import sys #")]));
        assert!(code.contains(r#""A": "x'\"\n\\); import sys #""#), "{code}");
        assert!(code.contains(r#"for _k in ["A"]"#), "{code}");
    }

    #[test]
    fn restore_only_touches_its_own_names() {
        let code = restore_code();
        assert!(code.contains("_roost_saved_environ"));
        assert!(code.ends_with("del _roost_os, _roost_k, _roost_v\n"));
    }

    #[test]
    fn names_with_equals_or_nul_and_values_with_nul_are_refused() {
        assert_eq!(validate(&vars(&[("OK", "v")])), Ok(()));
        assert_eq!(validate(&vars(&[("", "v")])), Err(InvalidEnvVar::EmptyName));
        assert!(matches!(
            validate(&vars(&[("A=B", "v")])),
            Err(InvalidEnvVar::BadName(_))
        ));
        assert!(matches!(
            validate(&vars(&[("A", "a\0b")])),
            Err(InvalidEnvVar::BadValue(_))
        ));
    }

    /// Runs the snippets in a real Python when one is at hand (`ROOST_SDK_PYTHON` or
    /// `python3`): the variable is set, then restored or removed.
    #[test]
    fn the_snippets_set_and_restore_in_python() {
        let python = std::env::var("ROOST_SDK_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = format!(
            "import os\nos.environ['KEEP'] = 'old'\nos.environ.pop('NEW', None)\n{}\
             assert os.environ['KEEP'] == 'n\\'ew' and os.environ['NEW'] == '1', dict(os.environ)\n{}\
             assert os.environ['KEEP'] == 'old' and 'NEW' not in os.environ\n\
             assert not hasattr(os, '_roost_saved_environ')\nprint('ok')\n",
            set_code(&vars(&[("KEEP", "n'ew"), ("NEW", "1")])),
            restore_code()
        );
        let output = std::process::Command::new(&python)
            .arg("-c")
            .arg(&script)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        assert!(
            output.status.success(),
            "{}\n{script}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "ok");
    }
}
