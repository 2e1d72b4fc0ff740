//! `roost-agent interpreter` over plain HTTP with real kernels (from the SDK venv, see
//! `interpreter_support`): what the SDK does not show — keepalives, a kernel that exits, a
//! restart during a cell, a dropped connection, the access token on a real socket.

mod interpreter_support;

use std::io::{BufRead, BufReader};
use std::time::{Duration, Instant};

use interpreter_support::{Interpreter, execute, open, request};
use serde_json::{Value, json};

fn types(lines: &[Value]) -> Vec<&str> {
    lines.iter().filter_map(|l| l["type"].as_str()).collect()
}

#[test]
fn a_long_cell_streams_keepalives_every_five_seconds() {
    let interpreter = Interpreter::start(0, &[]);
    let lines = execute(
        interpreter.addr,
        &json!({"code": "import time\ntime.sleep(6)\nprint('done')"}),
    );
    let kinds = types(&lines);
    let keepalive = kinds.iter().position(|t| *t == "keepalive");
    let stdout = kinds.iter().position(|t| *t == "stdout");
    assert!(
        matches!((keepalive, stdout), (Some(k), Some(s)) if k < s),
        "{kinds:?}"
    );
    assert_eq!(kinds.last(), Some(&"end_of_execution"));
}

#[test]
fn a_kernel_that_exits_is_reported_and_replaced() {
    let interpreter = Interpreter::start(0, &[]);
    execute(interpreter.addr, &json!({"code": "gone = 1"}));
    let lines = execute(interpreter.addr, &json!({"code": "import os\nos._exit(3)"}));
    let error = lines
        .iter()
        .find(|l| l["type"] == "error")
        .unwrap_or_else(|| panic!("no error line in {lines:?}"));
    assert_eq!(error["name"], "KernelDied");
    assert!(
        error["value"].as_str().unwrap().contains("exit status: 3"),
        "{error}"
    );
    assert_eq!(lines.last(), Some(&json!({"type": "end_of_execution"})));

    let lines = execute(interpreter.addr, &json!({"code": "'gone' in globals()"}));
    let result = lines
        .iter()
        .find(|l| l["type"] == "result")
        .expect("result");
    assert_eq!(result["text"], "False", "a fresh kernel: {lines:?}");
    assert!(lines.contains(&json!({"type": "number_of_executions", "execution_count": 1})));
}

#[test]
fn restarting_a_context_ends_its_running_cell_and_keeps_its_id() {
    let interpreter = Interpreter::start(0, &[]);
    let created = request(interpreter.addr, "POST", "/contexts", &[], "{}");
    assert_eq!(created.status, 200, "{created:?}");
    let context = created.json();
    let id = context["id"].as_str().expect("id").to_owned();
    assert_eq!(context["language"], "python");
    assert_eq!(context["cwd"], interpreter.dir.path().display().to_string());

    let addr = interpreter.addr;
    let body = json!({"code": "import time\ntime.sleep(60)", "context_id": id}).to_string();
    let mut stream = BufReader::new(open(addr, "POST", "/execute", &[], &body));
    // Wait until the cell runs: its execution count comes first.
    let mut line = String::new();
    while !line.contains("number_of_executions") {
        line.clear();
        assert!(
            stream.read_line(&mut line).expect("read") > 0,
            "stream ended early"
        );
    }
    let started = Instant::now();
    let restart = request(addr, "POST", &format!("/contexts/{id}/restart"), &[], "");
    assert_eq!(restart.status, 204, "{restart:?}");
    let rest: Vec<String> = stream.lines().map(|l| l.expect("line")).collect();
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        rest.iter().any(|l| l.contains("KernelDied")),
        "the cell ends with an error: {rest:?}"
    );

    let lines = execute(addr, &json!({"code": "21 * 2", "context_id": id}));
    assert!(lines.iter().any(|l| l["text"] == "42"), "{lines:?}");
    let listed = request(addr, "GET", "/contexts", &[], "").json();
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["id"] == id.as_str()),
        "{listed}"
    );
}

#[test]
fn dropping_the_connection_interrupts_the_cell() {
    let interpreter = Interpreter::start(0, &[]);
    let addr = interpreter.addr;
    execute(addr, &json!({"code": "kept = 'yes'"}));
    let body = json!({"code": "import time\ntime.sleep(60)"}).to_string();
    let mut stream = BufReader::new(open(addr, "POST", "/execute", &[], &body));
    let mut line = String::new();
    while !line.contains("number_of_executions") {
        line.clear();
        assert!(stream.read_line(&mut line).expect("read") > 0);
    }
    drop(stream);
    let started = Instant::now();
    let lines = execute(addr, &json!({"code": "kept"}));
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the next cell waited {:?}",
        started.elapsed()
    );
    assert!(lines.iter().any(|l| l["text"] == "yes"), "{lines:?}");
}

#[test]
fn the_access_token_is_checked_on_a_real_socket() {
    let interpreter = Interpreter::start(0, &["--access-token", "t0ken"]);
    let addr = interpreter.addr;
    assert_eq!(request(addr, "GET", "/health", &[], "").status, 200);
    let denied = request(addr, "POST", "/execute", &[], r#"{"code": "1"}"#);
    assert_eq!(denied.status, 401);
    assert_eq!(denied.json()["code"], 401);
    let wrong = request(addr, "GET", "/contexts", &[("X-Access-Token", "t0ke")], "");
    assert_eq!(wrong.status, 401);
    let allowed = request(
        addr,
        "POST",
        "/execute",
        &[("X-Access-Token", "t0ken")],
        r#"{"code": "6 * 7"}"#,
    );
    assert_eq!(allowed.status, 200);
    assert!(allowed.lines().iter().any(|l| l["text"] == "42"));
}

#[test]
fn a_bad_request_on_a_real_socket_is_a_json_error_and_the_server_lives_on() {
    let interpreter = Interpreter::start(0, &[]);
    let addr = interpreter.addr;
    let bad = request(addr, "POST", "/execute", &[], "{\"code\": ");
    assert_eq!(bad.status, 400);
    assert_eq!(bad.json()["code"], 400);
    let unknown = request(
        addr,
        "POST",
        "/execute",
        &[],
        r#"{"code": "1", "context_id": "nope"}"#,
    );
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["message"], "context nope not found");
    assert_eq!(request(addr, "GET", "/health", &[], "").json(), json!("OK"));
}
