//! Who may do what: access tokens, signed `/files` URLs, the private `/init` socket, and a
//! non-root user confined by Unix permissions whatever paths and symlinks it names.

mod envd_support;

use std::os::unix::fs::PermissionsExt;

use envd_support::Agent;
use envd_support::http::{basic, envelope, send, send_chunked};

const UNARY: (&str, &str) = ("Content-Type", "application/json");
const STREAM: (&str, &str) = ("Content-Type", "application/connect+json");
const TOKEN: &str = "s3cret-token";

fn stat(agent: &Agent, user: &str, path: &str) -> envd_support::http::Reply {
    let body = serde_json::json!({ "path": path }).to_string();
    send(
        agent.addr,
        "POST",
        "/filesystem.Filesystem/Stat",
        &[UNARY, ("Authorization", &basic(user))],
        body.as_bytes(),
    )
}

#[test]
fn envd_access_token_guards_every_route_but_health() {
    let agent = Agent::start(0, &["--access-token", TOKEN]);
    assert_eq!(send(agent.addr, "GET", "/health", &[], b"").status, 204);
    for (method, path, headers, body) in [
        ("POST", "/process.Process/List", vec![UNARY], &b"{}"[..]),
        (
            "POST",
            "/filesystem.Filesystem/Stat",
            vec![UNARY],
            br#"{"path":"/"}"#,
        ),
        (
            "POST",
            "/process.Process/Start",
            vec![STREAM],
            &envelope(0, b"{}")[..],
        ),
        ("GET", "/envs", vec![], b""),
        ("GET", "/files?path=/etc/hostname", vec![], b""),
    ] {
        for token in [None, Some("wrong"), Some("s3cret-tokenX")] {
            let mut headers = headers.clone();
            if let Some(token) = token {
                headers.push(("X-Access-Token", token));
            }
            let reply = send(agent.addr, method, path, &headers, body);
            assert_eq!(reply.status, 401, "{method} {path} with token {token:?}");
        }
        let mut headers = headers.clone();
        headers.push(("X-Access-Token", TOKEN));
        headers.push(("Authorization", "Basic cm9vdDo=")); // root:
        let reply = send(agent.addr, method, path, &headers, body);
        assert_ne!(reply.status, 401, "{method} {path} with the right token");
    }
}

#[test]
fn envd_signed_file_urls() {
    use base64::Engine;
    use sha2::Digest;
    let agent = Agent::start(0, &["--access-token", TOKEN]);
    let path = agent.root_path().join("signed.txt");
    std::fs::write(&path, "signed content").unwrap();
    let path = path.to_str().unwrap();
    let sign = |operation: &str, expiration: Option<i64>| {
        let raw = match expiration {
            Some(e) => format!("{path}:{operation}:root:{TOKEN}:{e}"),
            None => format!("{path}:{operation}:root:{TOKEN}"),
        };
        let digest = sha2::Sha256::digest(raw.as_bytes());
        format!(
            "v1_{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        )
    };
    let url = |signature: &str, expiration: Option<i64>| {
        let mut url = format!(
            "/files?path={path}&username=root&signature={}",
            signature.replace('+', "%2B").replace('/', "%2F")
        );
        if let Some(e) = expiration {
            url += &format!("&signature_expiration={e}");
        }
        url
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    let reply = send(agent.addr, "GET", &url(&sign("read", None), None), &[], b"");
    assert_eq!(
        (reply.status, reply.body.as_slice()),
        (200, &b"signed content"[..])
    );
    let future = Some(now + 600);
    assert_eq!(
        send(
            agent.addr,
            "GET",
            &url(&sign("read", future), future),
            &[],
            b""
        )
        .status,
        200
    );

    let past = Some(now - 10);
    let expired = send(agent.addr, "GET", &url(&sign("read", past), past), &[], b"");
    assert_eq!(expired.status, 401);
    assert!(
        expired.json()["message"]
            .as_str()
            .unwrap()
            .contains("expired")
    );
    // A read signature does not allow writing, nor another path.
    let write = send(
        agent.addr,
        "POST",
        &url(&sign("read", None), None),
        &[("Content-Type", "application/octet-stream")],
        b"x",
    );
    assert_eq!(write.status, 401);
    let other = url(&sign("read", None), None).replace("signed.txt", "other.txt");
    assert_eq!(send(agent.addr, "GET", &other, &[], b"").status, 401);
    let write = send(
        agent.addr,
        "POST",
        &url(&sign("write", None), None),
        &[("Content-Type", "application/octet-stream")],
        b"rewritten",
    );
    assert_eq!(write.status, 200);
    assert_eq!(std::fs::read_to_string(path).unwrap(), "rewritten");
}

#[test]
fn envd_init_only_on_the_private_socket() {
    let agent = Agent::start(0, &[]);
    let body =
        format!(r#"{{"accessToken":"{TOKEN}","envVars":{{"ROOST_X":"1"}},"defaultUser":"root"}}"#);
    let public = send(agent.addr, "POST", "/init", &[UNARY], body.as_bytes());
    assert_eq!(public.status, 403);
    assert_eq!(
        send(agent.addr, "GET", "/envs", &[], b"").status,
        200,
        "still no token"
    );

    let mode = std::fs::metadata(&agent.init_socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "only root may connect");
    let mut stream = std::os::unix::net::UnixStream::connect(&agent.init_socket).unwrap();
    use std::io::{Read, Write};
    write!(
        stream,
        "POST /init HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut reply = String::new();
    stream.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 204"), "{reply}");

    assert_eq!(
        send(agent.addr, "GET", "/envs", &[], b"").status,
        401,
        "token now required"
    );
    let envs = send(
        agent.addr,
        "GET",
        "/envs",
        &[("X-Access-Token", TOKEN)],
        b"",
    );
    assert_eq!(envs.json()["ROOST_X"], "1");
    // defaultUser is now root: a process without Authorization runs as root.
    let start = envelope(0, br#"{"process":{"cmd":"id","args":["-u"]}}"#);
    let reply = send(
        agent.addr,
        "POST",
        "/process.Process/Start",
        &[STREAM, ("X-Access-Token", TOKEN)],
        &start,
    );
    let stdout = reply
        .envelopes()
        .iter()
        .find_map(|(_, j)| j["event"]["data"]["stdout"].as_str().map(str::to_owned))
        .unwrap();
    assert_eq!(stdout, "MAo="); // "0\n"
}

#[test]
fn envd_unknown_or_malformed_user_is_unauthenticated() {
    let agent = Agent::start(0, &[]);
    let reply = stat(&agent, "no-such-user-roost", "/");
    assert_eq!(
        (reply.status, reply.json()["code"].clone()),
        (401, "unauthenticated".into())
    );
    let reply = send(
        agent.addr,
        "POST",
        "/filesystem.Filesystem/Stat",
        &[UNARY, ("Authorization", "Basic %%%")],
        br#"{"path":"/"}"#,
    );
    assert_eq!(reply.status, 401);
}

/// A root-only directory with a secret, and traps pointing at it from `user`'s root.
fn plant_secret(agent: &Agent) -> std::path::PathBuf {
    let vault = tempfile::Builder::new()
        .prefix("roost-vault-")
        .tempdir()
        .unwrap()
        .keep();
    std::fs::set_permissions(&vault, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::write(vault.join("secret.txt"), "top secret").unwrap();
    std::os::unix::fs::symlink(
        vault.join("secret.txt"),
        agent.root_path().join("link-to-secret"),
    )
    .unwrap();
    std::os::unix::fs::symlink(&vault, agent.root_path().join("link-to-vault")).unwrap();
    vault
}

#[test]
fn envd_user_cannot_escape_by_traversal_or_symlinks() {
    let agent = Agent::start(0, &[]);
    let vault = plant_secret(&agent);
    let secret = vault.join("secret.txt");
    let depth = agent.root_path().components().count();
    let traversal = format!(
        "{}{}",
        "../".repeat(depth + 2),
        secret.display().to_string().trim_start_matches('/')
    );

    // Stat through `..` and through a symlinked directory: permission denied for `user`,
    // while root sees the file.
    for path in [traversal.as_str(), "link-to-vault/secret.txt"] {
        let reply = stat(&agent, "user", path);
        assert_eq!(reply.json()["code"], "permission_denied", "{path}");
        assert_eq!(stat(&agent, "root", path).status, 200, "{path} as root");
    }
    // Reading the file through a symlink in the user's own directory: refused.
    let read = send(
        agent.addr,
        "GET",
        "/files?path=link-to-secret&username=user",
        &[],
        b"",
    );
    assert_eq!(read.status, 403, "{}", String::from_utf8_lossy(&read.body));
    assert!(!String::from_utf8_lossy(&read.body).contains("top secret"));
    let read = send(
        agent.addr,
        "GET",
        "/files?path=link-to-secret&username=root",
        &[],
        b"",
    );
    assert_eq!(read.body, b"top secret");

    // Writing through the directory symlink, or moving the secret out: refused.
    let write = send(
        agent.addr,
        "POST",
        "/files?path=link-to-vault/planted.txt&username=user",
        &[("Content-Type", "application/octet-stream")],
        b"x",
    );
    assert_eq!(write.status, 403);
    assert!(!vault.join("planted.txt").exists());
    let moved = send(
        agent.addr,
        "POST",
        "/filesystem.Filesystem/Move",
        &[UNARY, ("Authorization", &basic("user"))],
        serde_json::json!({"source": secret, "destination": "stolen.txt"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(moved.json()["code"], "permission_denied");
    assert!(secret.exists());
    let listed = send(
        agent.addr,
        "POST",
        "/filesystem.Filesystem/ListDir",
        &[UNARY, ("Authorization", &basic("user"))],
        br#"{"path":"link-to-vault","depth":1}"#,
    );
    assert_eq!(listed.json()["code"], "permission_denied");
    let removed = send(
        agent.addr,
        "POST",
        "/filesystem.Filesystem/Remove",
        &[UNARY, ("Authorization", &basic("user"))],
        serde_json::json!({ "path": secret }).to_string().as_bytes(),
    );
    assert_eq!(removed.json()["code"], "permission_denied");
    // A process as `user` is just as confined.
    let start = envelope(
        0,
        serde_json::json!({"process": {"cmd": "cat", "args": [secret]}})
            .to_string()
            .as_bytes(),
    );
    let reply = send(
        agent.addr,
        "POST",
        "/process.Process/Start",
        &[STREAM, ("Authorization", &basic("user"))],
        &start,
    );
    let end = reply
        .envelopes()
        .iter()
        .find_map(|(_, j)| j["event"].get("end").cloned())
        .unwrap();
    assert_eq!(end["exitCode"], 1);
    std::fs::remove_dir_all(&vault).unwrap();
}

#[test]
fn envd_files_errors_are_clear() {
    let agent = Agent::start(0, &[]);
    let missing = send(agent.addr, "GET", "/files?path=nope.txt", &[], b"");
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["code"], 404);
    assert_eq!(
        send(agent.addr, "GET", "/files", &[], b"").status,
        400,
        "no path"
    );
    let dir = send(
        agent.addr,
        "GET",
        &format!("/files?path={}", agent.root_path().display()),
        &[],
        b"",
    );
    assert_eq!(dir.status, 400, "a directory");
    let wrong_type = send(
        agent.addr,
        "POST",
        "/files?path=x",
        &[("Content-Type", "text/plain")],
        b"x",
    );
    assert_eq!(wrong_type.status, 415);
    let bad_form = send(
        agent.addr,
        "POST",
        "/files?path=x",
        &[("Content-Type", "multipart/form-data; boundary=zzz")],
        b"--zzz\r\nbroken",
    );
    assert_eq!(bad_form.status, 400);
    let bad_gzip = send(
        agent.addr,
        "POST",
        "/files?path=x.gz",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Content-Encoding", "gzip"),
        ],
        b"not gzip at all",
    );
    assert_eq!(
        bad_gzip.status,
        400,
        "{}",
        String::from_utf8_lossy(&bad_gzip.body)
    );
    assert_eq!(send(agent.addr, "GET", "/health", &[], b"").status, 204);
}

/// A refused upload is answered cleanly even while the client is still streaming its body
/// (chunked, as the SDKs send files): envd reads and drops the rest instead of closing the
/// connection on unread bytes, which makes the kernel reset it — the client's next write
/// fails and the refusal can be lost before it is read.
#[test]
fn envd_refused_streamed_upload_is_answered_not_reset() {
    let agent = Agent::start(0, &[]);
    let chunk = vec![7u8; 64 << 10];
    let chunks: Vec<&[u8]> = (0..20).map(|_| chunk.as_slice()).collect();
    let reply = send_chunked(
        agent.addr,
        "/files?path=/root/roost-refused-upload.bin",
        &[
            ("Content-Type", "application/octet-stream"),
            ("Authorization", &basic("user")),
        ],
        &chunks,
    );
    assert!(
        (400..500).contains(&reply.status),
        "a 4xx refusal, got {} {}",
        reply.status,
        String::from_utf8_lossy(&reply.body)
    );
    assert!(!std::path::Path::new("/root/roost-refused-upload.bin").exists());
}
