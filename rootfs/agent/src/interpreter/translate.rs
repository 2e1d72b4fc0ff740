//! Jupyter IOPub messages → `/execute` output lines.
//!
//! The mapping follows E2B's own server, so that the SDK sees what it sees there: `stream`
//! becomes `stdout`/`stderr`, `display_data` a result with `is_main_result: false`,
//! `execute_result` one with `is_main_result: true`, `error` an error whose traceback is the
//! kernel's traceback lines joined, and `execute_input` the execution count. `status` tells the
//! caller when the kernel took the request and when it is done with it.

use jupyter_zmq_client::{ExecutionState, JupyterMessage, JupyterMessageContent, Media, Stdio};
use serde_json::{Map, Value};

use super::wire::{OutputLine, ResultData};

/// What one IOPub message means for the execution it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub enum Translated {
    /// A line for the client.
    Output(OutputLine),
    /// The kernel started the request (`execute_input`): also a line for the client.
    InputAccepted(OutputLine),
    /// The kernel is busy with the request.
    Busy,
    /// The kernel finished the request.
    Idle,
    /// Nothing the client needs (comm messages, `clear_output`, other states...).
    Nothing,
}

/// Translates one IOPub message (already matched to its request by the parent header).
pub fn translate(message: &JupyterMessage) -> Translated {
    let timestamp = message.header.date.timestamp_nanos_opt().unwrap_or(0);
    match &message.content {
        JupyterMessageContent::StreamContent(stream) => {
            let text = stream.text.clone();
            Translated::Output(match stream.name {
                Stdio::Stdout => OutputLine::Stdout { text, timestamp },
                Stdio::Stderr => OutputLine::Stderr { text, timestamp },
            })
        }
        JupyterMessageContent::DisplayData(display) => Translated::Output(OutputLine::Result(
            Box::new(result_from_media(&display.data, false)),
        )),
        JupyterMessageContent::ExecuteResult(result) => Translated::Output(OutputLine::Result(
            Box::new(result_from_media(&result.data, true)),
        )),
        JupyterMessageContent::ErrorOutput(error) => Translated::Output(OutputLine::Error {
            name: error.ename.clone(),
            value: error.evalue.clone(),
            traceback: error.traceback.join("\n"),
        }),
        JupyterMessageContent::ExecuteInput(input) => {
            Translated::InputAccepted(OutputLine::NumberOfExecutions {
                execution_count: u64::try_from(input.execution_count.value()).unwrap_or(u64::MAX),
            })
        }
        JupyterMessageContent::Status(status) => match status.execution_state {
            ExecutionState::Busy => Translated::Busy,
            ExecutionState::Idle => Translated::Idle,
            _ => Translated::Nothing,
        },
        _ => Translated::Nothing,
    }
}

/// Splits a mime bundle into the SDK's result fields.
pub fn result_from_media(media: &Media, is_main_result: bool) -> ResultData {
    let bundle = match serde_json::to_value(media) {
        Ok(Value::Object(map)) => map,
        // `Media` always serialises to a map; anything else carries nothing we could show.
        _ => Map::new(),
    };
    result_from_bundle(bundle, is_main_result)
}

/// Splits a mime bundle (`{"text/plain": ..., "image/png": ...}`) into the SDK's result fields;
/// what has no field of its own goes to `extra`.
pub fn result_from_bundle(mut bundle: Map<String, Value>, is_main_result: bool) -> ResultData {
    let mut take_text = |mime: &str| match bundle.remove(mime) {
        Some(Value::String(text)) => Some(text),
        // Some kernels send multi-line text as a list of lines (the notebook format).
        Some(Value::Array(lines)) => Some(
            lines
                .iter()
                .filter_map(Value::as_str)
                .collect::<Vec<_>>()
                .concat(),
        ),
        Some(other) => Some(other.to_string()),
        None => None,
    };
    let text = take_text("text/plain").map(strip_repr_quotes);
    let html = take_text("text/html");
    let markdown = take_text("text/markdown");
    let svg = take_text("image/svg+xml");
    let png = take_text("image/png").map(strip_whitespace);
    let jpeg = take_text("image/jpeg").map(strip_whitespace);
    let pdf = take_text("application/pdf");
    let latex = take_text("text/latex");
    let javascript = take_text("application/javascript");
    let json = bundle.remove("application/json");
    let data = bundle.remove("e2b/data");
    let chart = bundle.remove("e2b/chart");
    ResultData {
        text,
        html,
        markdown,
        svg,
        png,
        jpeg,
        pdf,
        latex,
        json,
        javascript,
        data,
        chart,
        is_main_result,
        extra: bundle,
    }
}

/// A string's repr comes quoted (`'abc'`); E2B gives the SDK the bare text, so do we.
fn strip_repr_quotes(text: String) -> String {
    match text.strip_prefix('\'').and_then(|t| t.strip_suffix('\'')) {
        Some(inner) => inner.to_owned(),
        None => text,
    }
}

/// Base64 from the kernel may be wrapped in lines; the SDK wants one string.
fn strip_whitespace(text: String) -> String {
    if text.contains(char::is_whitespace) {
        text.chars().filter(|c| !c.is_whitespace()).collect()
    } else {
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jupyter_zmq_client::{
        DisplayData, ErrorOutput, ExecuteInput, ExecuteResult, ExecutionCount, MediaType, Status,
        StreamContent,
    };
    use serde_json::json;

    fn message(content: impl Into<JupyterMessageContent>) -> JupyterMessage {
        JupyterMessage::new(content, None)
    }

    #[test]
    fn streams_become_stdout_and_stderr_lines_with_the_message_time() {
        let stdout = message(StreamContent::stdout("hello\n"));
        let nanos = stdout.header.date.timestamp_nanos_opt().unwrap();
        assert!(nanos > 0);
        assert_eq!(
            translate(&stdout),
            Translated::Output(OutputLine::Stdout {
                text: "hello\n".into(),
                timestamp: nanos
            })
        );
        let stderr = message(StreamContent::stderr("oops"));
        assert!(matches!(
            translate(&stderr),
            Translated::Output(OutputLine::Stderr { text, .. }) if text == "oops"
        ));
    }

    #[test]
    fn display_data_is_a_side_result_and_execute_result_the_main_one() {
        let png = "iVBORw0KGgo=";
        let display = message(DisplayData::new(Media::new(vec![
            MediaType::Plain("<Figure size 640x480 with 1 Axes>".into()),
            MediaType::Png(png.into()),
        ])));
        let Translated::Output(OutputLine::Result(result)) = translate(&display) else {
            panic!("not a result");
        };
        assert!(!result.is_main_result);
        assert_eq!(result.png.as_deref(), Some(png));
        assert_eq!(
            result.text.as_deref(),
            Some("<Figure size 640x480 with 1 Axes>")
        );
        assert!(result.extra.is_empty());

        let main = message(ExecuteResult::new(
            ExecutionCount::new(4),
            Media::new(vec![MediaType::Plain("'abc'".into())]),
        ));
        let Translated::Output(OutputLine::Result(result)) = translate(&main) else {
            panic!("not a result");
        };
        assert!(result.is_main_result);
        assert_eq!(
            result.text.as_deref(),
            Some("abc"),
            "repr quotes are stripped"
        );
    }

    #[test]
    fn every_mime_type_lands_in_its_field_and_the_rest_in_extra() {
        let bundle = json!({
            "text/plain": "t", "text/html": "<b>h</b>", "text/markdown": "*m*",
            "image/svg+xml": "<svg/>", "image/png": "iVBO\nRw==\n", "image/jpeg": "/9j/",
            "application/pdf": "JVBE", "text/latex": "$x$",
            "application/json": {"a": [1, 2]}, "application/javascript": "alert(1)",
            "e2b/data": {"rows": []}, "e2b/chart": {"type": "line"},
            "image/gif": "R0lG", "application/vnd.custom+json": {"k": true}
        });
        let Value::Object(bundle) = bundle else {
            unreachable!()
        };
        let result = result_from_bundle(bundle, false);
        assert_eq!(result.text.as_deref(), Some("t"));
        assert_eq!(result.html.as_deref(), Some("<b>h</b>"));
        assert_eq!(result.markdown.as_deref(), Some("*m*"));
        assert_eq!(result.svg.as_deref(), Some("<svg/>"));
        assert_eq!(
            result.png.as_deref(),
            Some("iVBORw=="),
            "line breaks removed"
        );
        assert_eq!(result.jpeg.as_deref(), Some("/9j/"));
        assert_eq!(result.pdf.as_deref(), Some("JVBE"));
        assert_eq!(result.latex.as_deref(), Some("$x$"));
        assert_eq!(result.json, Some(json!({"a": [1, 2]})));
        assert_eq!(result.javascript.as_deref(), Some("alert(1)"));
        assert_eq!(result.data, Some(json!({"rows": []})));
        assert_eq!(result.chart, Some(json!({"type": "line"})));
        assert_eq!(
            Value::Object(result.extra),
            json!({"image/gif": "R0lG", "application/vnd.custom+json": {"k": true}})
        );
    }

    #[test]
    fn multi_line_text_in_notebook_form_is_joined() {
        let Value::Object(bundle) = json!({"text/html": ["<p>", "x", "</p>"]}) else {
            unreachable!()
        };
        assert_eq!(
            result_from_bundle(bundle, true).html.as_deref(),
            Some("<p>x</p>")
        );
    }

    #[test]
    fn a_quote_alone_is_not_stripped_into_nothing_twice() {
        assert_eq!(strip_repr_quotes("'".into()), "'");
        assert_eq!(strip_repr_quotes("''".into()), "");
        assert_eq!(strip_repr_quotes("'a' + 'b'".into()), "a' + 'b");
        assert_eq!(strip_repr_quotes("\"x\"".into()), "\"x\"");
    }

    #[test]
    fn errors_carry_name_value_and_the_joined_traceback() {
        let error = message(ErrorOutput {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec![
                "---------------------------------------------------------------------------"
                    .into(),
                "ZeroDivisionError                         Traceback (most recent call last)"
                    .into(),
                "ZeroDivisionError: division by zero".into(),
            ],
        });
        let Translated::Output(OutputLine::Error {
            name,
            value,
            traceback,
        }) = translate(&error)
        else {
            panic!("not an error");
        };
        assert_eq!(name, "ZeroDivisionError");
        assert_eq!(value, "division by zero");
        assert_eq!(traceback.lines().count(), 3);
        assert!(traceback.ends_with("ZeroDivisionError: division by zero"));
    }

    #[test]
    fn execute_input_gives_the_execution_count_and_status_the_progress() {
        let input = message(ExecuteInput {
            code: "1".into(),
            execution_count: ExecutionCount::new(12),
        });
        assert_eq!(
            translate(&input),
            Translated::InputAccepted(OutputLine::NumberOfExecutions {
                execution_count: 12
            })
        );
        assert_eq!(translate(&message(Status::busy())), Translated::Busy);
        assert_eq!(translate(&message(Status::idle())), Translated::Idle);
        assert_eq!(translate(&message(Status::starting())), Translated::Nothing);
    }
}
