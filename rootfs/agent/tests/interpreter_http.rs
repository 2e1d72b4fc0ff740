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
    assert_a_dropped_connection_interrupts(&Interpreter::start(0, &[]));
}

/// Init blocks SIGINT, SIGTERM, SIGCHLD... and its children inherit the mask: the interpreter
/// must unblock them, or SIGINT never reaches a kernel (and SIGTERM never stops it).
#[test]
fn started_with_init_s_signals_blocked_it_still_interrupts_and_stops() {
    let interpreter = Interpreter::start_as_init_would(0, &[]);
    assert_a_dropped_connection_interrupts(&interpreter);
    let lines = execute(
        interpreter.addr,
        &json!({"code": "import signal\nsorted(int(s) for s in signal.pthread_sigmask(signal.SIG_BLOCK, []))"}),
    );
    assert!(
        lines.iter().any(|l| l["text"] == "[]"),
        "kernel mask: {lines:?}"
    );
}

fn assert_a_dropped_connection_interrupts(interpreter: &Interpreter) {
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

/// A stand-in for envd's `GET /envs`: answers with one variable when given the right token,
/// and records the tokens it was asked with.
fn fake_envd() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|n| n == 1) {
                head.push(byte[0]);
            }
            let head = String::from_utf8_lossy(&head).into_owned();
            let token = head
                .lines()
                .find_map(|l| l.strip_prefix("X-Access-Token: "))
                .unwrap_or_default()
                .to_owned();
            let reply = if head.starts_with("GET /envs ") && token == "t0ken" {
                "HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n{\"ROOST_SANDBOX_VAR\":\"from-envd\"}"
            } else {
                "HTTP/1.0 401 Unauthorized\r\n\r\n"
            };
            let _ = stream.write_all(reply.as_bytes());
            let _ = tx.send(token);
        }
    });
    (addr, rx)
}

#[test]
fn the_sandboxs_env_vars_come_from_envd_once_per_kernel() {
    let (envd, asked) = fake_envd();
    let envd = envd.to_string();
    let interpreter = Interpreter::start(0, &["--access-token", "t0ken", "--envd", &envd]);
    let run = |body: Value| {
        let reply = request(
            interpreter.addr,
            "POST",
            "/execute",
            &[("X-Access-Token", "t0ken")],
            &body.to_string(),
        );
        assert_eq!(reply.status, 200, "{reply:?}");
        let lines = reply.lines();
        lines
            .iter()
            .filter(|l| l["type"] == "stdout")
            .map(|l| l["text"].as_str().unwrap_or_default().to_owned())
            .collect::<String>()
    };
    let code = "import os\nprint(os.environ.get('ROOST_SANDBOX_VAR'))";
    assert_eq!(run(json!({"code": code})), "from-envd\n");
    assert_eq!(
        run(json!({"code": code, "env_vars": {"ROOST_SANDBOX_VAR": "override"}})),
        "override\n"
    );
    assert_eq!(
        run(json!({"code": code})),
        "from-envd\n",
        "restored to envd's value"
    );
    let tokens: Vec<String> = asked.try_iter().collect();
    assert_eq!(tokens, ["t0ken"], "asked once, with the caller's token");
}
