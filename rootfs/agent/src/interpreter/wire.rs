//! The JSON the code interpreter speaks on :49999, as `e2b-code-interpreter` expects it.
//!
//! Requests are parsed leniently (unknown fields are ignored, as a newer SDK may add some);
//! output lines are the E2B server's: one JSON object per line with a `type` field, fields that
//! have no value left out.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// `POST /execute`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ExecuteRequest {
    pub code: String,
    #[serde(default)]
    pub context_id: Option<String>,
    #[serde(default)]
    pub language: Option<String>,
    /// Set in the kernel's `os.environ` for this execution only.
    #[serde(default)]
    pub env_vars: Option<BTreeMap<String, String>>,
}

/// `POST /contexts`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CreateContextRequest {
    #[serde(default)]
    pub language: Option<String>,
    #[serde(default)]
    pub cwd: Option<String>,
}

/// A context as `POST /contexts` and `GET /contexts` return it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ContextInfo {
    pub id: String,
    pub language: String,
    pub cwd: String,
}

/// One line of the `/execute` stream.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputLine {
    Stdout {
        text: String,
        /// Unix time in nanoseconds (the kernel's message date).
        timestamp: i64,
    },
    Stderr {
        text: String,
        timestamp: i64,
    },
    Result(Box<ResultData>),
    Error {
        name: String,
        value: String,
        traceback: String,
    },
    NumberOfExecutions {
        execution_count: u64,
    },
    Keepalive,
    EndOfExecution,
}

/// A `display_data` or `execute_result` mime bundle, split into the SDK's fields. Images are
/// the kernel's base64 text, passed through.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResultData {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub markdown: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub svg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub png: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jpeg: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pdf: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latex: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub javascript: Option<String>,
    /// E2B's own `e2b/data` mime type (tabular data extracted from a cell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<Value>,
    /// E2B's `e2b/chart` mime type (a chart extracted from a matplotlib figure).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chart: Option<Value>,
    /// True for the cell's value (`execute_result`), false for `display()` calls and figures.
    pub is_main_result: bool,
    /// Every other mime type of the bundle, by mime type.
    pub extra: Map<String, Value>,
}

/// The body of every error reply: `{"code": 404, "message": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ErrorBody {
    pub code: u16,
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_lines_carry_their_type_tag() {
        let line = OutputLine::Stdout {
            text: "hi\n".into(),
            timestamp: 7,
        };
        assert_eq!(
            serde_json::to_value(&line).unwrap(),
            json!({"type": "stdout", "text": "hi\n", "timestamp": 7})
        );
        assert_eq!(
            serde_json::to_value(OutputLine::EndOfExecution).unwrap(),
            json!({"type": "end_of_execution"})
        );
        assert_eq!(
            serde_json::to_value(OutputLine::NumberOfExecutions { execution_count: 3 }).unwrap(),
            json!({"type": "number_of_executions", "execution_count": 3})
        );
    }

    #[test]
    fn a_result_line_leaves_out_missing_formats() {
        let line = OutputLine::Result(Box::new(ResultData {
            text: Some("2".into()),
            is_main_result: true,
            ..ResultData::default()
        }));
        assert_eq!(
            serde_json::to_value(&line).unwrap(),
            json!({"type": "result", "text": "2", "is_main_result": true, "extra": {}})
        );
    }

    #[test]
    fn execute_requests_accept_nulls_and_unknown_fields() {
        let request: ExecuteRequest = serde_json::from_value(json!({
            "code": "1", "context_id": null, "language": null, "env_vars": null, "future": 1
        }))
        .unwrap();
        assert_eq!(
            request,
            ExecuteRequest {
                code: "1".into(),
                ..ExecuteRequest::default()
            }
        );
        assert!(serde_json::from_value::<ExecuteRequest>(json!({"context_id": "x"})).is_err());
    }
}
