//! Protocol edges of the envd API: malformed envelopes, wrong content types, oversized
//! headers and bodies, h2c, client streaming. Each must be a clear error and leave the agent
//! serving.

mod envd_support;

use envd_support::Agent;
use envd_support::http::{envelope, send, send_chunked};

const STREAM: (&str, &str) = ("Content-Type", "application/connect+json");
const UNARY: (&str, &str) = ("Content-Type", "application/json");

fn assert_alive(agent: &Agent) {
    assert_eq!(send(agent.addr, "GET", "/health", &[], b"").status, 204);
}

fn start_body(script: &str) -> Vec<u8> {
    let request = serde_json::json!({
        "process": {"cmd": "/bin/sh", "args": ["-c", script]},
        "stdin": true,
    });
    envelope(0, request.to_string().as_bytes())
}

#[test]
fn envd_unary_call_and_wrong_content_types() {
    let agent = Agent::start(0, &[]);
    let ok = send(agent.addr, "POST", "/process.Process/List", &[UNARY], b"{}");
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("content-type"), Some("application/json"));
    assert_eq!(ok.json(), serde_json::json!({}));
    // Fields a newer SDK might add are skipped, as connect-go does.
    let newer = send(
        agent.addr,
        "POST",
        "/process.Process/List",
        &[UNARY],
        br#"{"fromTheFuture": 1}"#,
    );
    assert_eq!(newer.status, 200);

    // A unary method called with the streaming type, a streaming one with the unary type,
    // and no type at all: 415 with a message naming the expected type.
    for (path, headers) in [
        ("/process.Process/List", vec![STREAM]),
        ("/process.Process/Start", vec![UNARY]),
        (
            "/filesystem.Filesystem/Stat",
            vec![("Content-Type", "application/proto")],
        ),
        ("/filesystem.Filesystem/Stat", vec![]),
    ] {
        let reply = send(agent.addr, "POST", path, &headers, b"{}");
        assert_eq!(reply.status, 415, "{path} {headers:?}");
        let text = String::from_utf8_lossy(&reply.body).to_string();
        assert!(text.contains("unsupported content type"), "{text}");
    }
    let unknown = send(agent.addr, "POST", "/process.Process/Nope", &[UNARY], b"{}");
    assert_eq!(unknown.status, 404);
    assert_alive(&agent);
}

#[test]
fn envd_malformed_messages_are_invalid_argument() {
    let agent = Agent::start(0, &[]);
    for body in [&b"{not json"[..], b"[1,2]", br#"{"path": 5}"#] {
        let reply = send(
            agent.addr,
            "POST",
            "/filesystem.Filesystem/Stat",
            &[UNARY],
            body,
        );
        assert_eq!(reply.status, 400, "{}", String::from_utf8_lossy(body));
        assert_eq!(reply.json()["code"], "invalid_argument");
    }
    let start = start_body("true");
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (start[..start.len() - 3].to_vec(), "invalid_argument"), // truncated payload
        (start[..3].to_vec(), "invalid_argument"),               // truncated header
        (Vec::new(), "invalid_argument"),                        // no envelope
        ([start.clone(), start.clone()].concat(), "invalid_argument"), // two messages
        (envelope(1, b"{}"), "unimplemented"),                   // compressed
        (envelope(0x80, b"{}"), "invalid_argument"),             // unknown flag
        (envelope(2, b"{}"), "invalid_argument"),                // end-stream from a client
        (envelope(0, b"{oops"), "invalid_argument"),             // bad JSON
        (vec![0, 0x7f, 0xff, 0xff, 0xff], "resource_exhausted"), // 2 GiB claimed
    ];
    for (body, code) in cases {
        let reply = send(
            agent.addr,
            "POST",
            "/process.Process/Start",
            &[STREAM],
            &body,
        );
        assert_eq!(
            reply.status, 200,
            "Connect streams report errors in the end envelope"
        );
        let error = reply.stream_error().expect("an error");
        assert_eq!(error["code"], code, "{body:?}: {error}");
        assert!(!error["message"].as_str().unwrap().is_empty());
    }
    assert_alive(&agent);
}

#[test]
fn envd_start_streams_start_data_end() {
    let agent = Agent::start(0, &[]);
    let reply = send(
        agent.addr,
        "POST",
        "/process.Process/Start",
        &[
            STREAM,
            ("Authorization", &envd_support::http::basic("root")),
        ],
        &start_body("printf out; printf err >&2; exit 7"),
    );
    assert_eq!(reply.status, 200);
    assert_eq!(
        reply.header("content-type"),
        Some("application/connect+json")
    );
    let envelopes = reply.envelopes();
    let events: Vec<&serde_json::Value> = envelopes.iter().map(|(_, j)| j).collect();
    assert!(events[0]["event"]["start"]["pid"].as_u64().unwrap() > 0);
    let mut stdout = String::new();
    let mut stderr = String::new();
    use base64::Engine;
    let decode = |v: &serde_json::Value| {
        String::from_utf8(
            base64::engine::general_purpose::STANDARD
                .decode(v.as_str().unwrap())
                .unwrap(),
        )
        .unwrap()
    };
    for event in &events {
        if let Some(data) = event["event"].get("data") {
            if let Some(out) = data.get("stdout") {
                stdout += &decode(out);
            }
            if let Some(err) = data.get("stderr") {
                stderr += &decode(err);
            }
        }
    }
    assert_eq!((stdout.as_str(), stderr.as_str()), ("out", "err"));
    let end = &events[events.len() - 2]["event"]["end"];
    assert_eq!(end["exitCode"], 7);
    assert_eq!(end["exited"], true);
    assert_eq!(end["status"], "exit status 7");
    assert_eq!(envelopes.last().unwrap(), &(2, serde_json::json!({})));
}

#[test]
fn envd_keepalives_follow_the_requested_interval() {
    let agent = Agent::start(0, &[]);
    let reply = send(
        agent.addr,
        "POST",
        "/process.Process/Start",
        &[STREAM, ("Keepalive-Ping-Interval", "1")],
        &start_body("sleep 2.5"),
    );
    let keepalives = reply
        .envelopes()
        .iter()
        .filter(|(_, j)| j["event"].get("keepalive").is_some())
        .count();
    assert!(
        (2..=3).contains(&keepalives),
        "{keepalives} keepalives in 2.5 s at 1 s"
    );
}

#[test]
fn envd_oversized_headers_and_bodies_are_refused() {
    let agent = Agent::start(0, &[]);
    let huge = "x".repeat(1 << 20);
    let reply = send(
        agent.addr,
        "POST",
        "/process.Process/List",
        &[UNARY, ("X-Huge", &huge)],
        b"{}",
    );
    assert_eq!(reply.status, 431, "oversized headers");
    let many: Vec<(String, String)> = (0..200).map(|i| (format!("X-H{i}"), "v".into())).collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let reply = send(agent.addr, "POST", "/process.Process/List", &many, b"{}");
    assert_eq!(reply.status, 431, "too many headers");

    let body = vec![b' '; 17 << 20];
    let reply = send(
        agent.addr,
        "POST",
        "/filesystem.Filesystem/Stat",
        &[UNARY],
        &body,
    );
    assert_eq!(
        reply.status, 413,
        "unary body over the 16 MiB message limit"
    );
    assert_alive(&agent);
}

#[test]
fn envd_client_streaming_input_reaches_the_process() {
    let agent = Agent::start(0, &[]);
    let root = envd_support::http::basic("root");
    // `head -c 5` ends once it has read what StreamInput sends.
    let start = std::thread::spawn({
        let addr = agent.addr;
        let root = root.clone();
        move || {
            send(
                addr,
                "POST",
                "/process.Process/Start",
                &[STREAM, ("Authorization", &root)],
                &start_body("head -c 5"),
            )
        }
    });
    let pid = loop {
        let list = send(agent.addr, "POST", "/process.Process/List", &[UNARY], b"{}").json();
        if let Some(pid) = list["processes"][0]["pid"].as_u64() {
            break pid;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut input = envelope(
        0,
        serde_json::json!({"start": {"process": {"pid": pid}}})
            .to_string()
            .as_bytes(),
    );
    input.extend(envelope(0, br#"{"keepalive": {}}"#));
    input.extend(envelope(
        0,
        br#"{"data": {"input": {"stdin": "aGVsbG8="}}}"#,
    )); // hello
    let reply = send(
        agent.addr,
        "POST",
        "/process.Process/StreamInput",
        &[STREAM],
        &input,
    );
    assert_eq!(reply.status, 200);
    assert_eq!(reply.stream_error(), None);

    let started = start.join().unwrap();
    let stdout: Vec<String> = started
        .envelopes()
        .iter()
        .filter_map(|(_, j)| j["event"]["data"]["stdout"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(stdout.concat(), "aGVsbG8=");

    // Input for a process that does not exist: a not_found end.
    let bad = envelope(0, br#"{"start": {"process": {"pid": 999999}}}"#);
    let reply = send(
        agent.addr,
        "POST",
        "/process.Process/StreamInput",
        &[STREAM],
        &bad,
    );
    assert_eq!(reply.stream_error().unwrap()["code"], "not_found");
}

#[test]
fn envd_speaks_h2c_with_prior_knowledge() {
    let agent = Agent::start(0, &[]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let stream = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .expect("h2c handshake");
        tokio::spawn(connection);
        let request = hyper::Request::post(format!("http://{}/process.Process/List", agent.addr))
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.version(), hyper::Version::HTTP_2);
        assert_eq!(response.status(), 200);
        use http_body_util::BodyExt;
        let body = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"{}");
    });
}

#[test]
fn envd_http1_chunked_request_bodies() {
    let agent = Agent::start(0, &[]);
    // A unary message split across chunks.
    let stat = send_chunked(
        agent.addr,
        "/filesystem.Filesystem/Stat",
        &[UNARY, ("Authorization", &envd_support::http::basic("root"))],
        &[br#"{"pa"#, br#"th": "/"}"#],
    );
    assert_eq!(stat.status, 200);
    assert_eq!(stat.json()["entry"]["type"], "FILE_TYPE_DIRECTORY");
    // A streaming request whose envelope is split inside its header.
    let start = start_body("echo chunked");
    let reply = send_chunked(
        agent.addr,
        "/process.Process/Start",
        &[
            STREAM,
            ("Authorization", &envd_support::http::basic("root")),
        ],
        &[&start[..3], &start[3..]],
    );
    assert_eq!(reply.stream_error(), None);
    // A file upload in many chunks.
    let target = agent.root_path().join("chunked.bin");
    let path = format!("/files?path={}&username=root", target.display());
    let pieces: Vec<Vec<u8>> = (0..20u8).map(|i| vec![i; 10_000]).collect();
    let refs: Vec<&[u8]> = pieces.iter().map(Vec::as_slice).collect();
    let reply = send_chunked(
        agent.addr,
        &path,
        &[("Content-Type", "application/octet-stream")],
        &refs,
    );
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    assert_eq!(std::fs::read(&target).unwrap(), pieces.concat());
}
