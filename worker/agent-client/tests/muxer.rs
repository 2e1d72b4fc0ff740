//! The client through a simulated VMM vsock muxer: a Unix socket per VM that expects
//! `CONNECT <port>\n`, answers `OK <host_port>\n` and then splices to the guest's listener (here
//! the agent's Unix socket), and a `<uds>_1024` listener for the agent's hello. This is the path
//! the worker uses in production, minus the virtio transport.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::agent_binary;
use roost_agent_client::{AgentClient, Connector, Error, ReadyListener, exec_argv};
use roost_proto::agent::AGENT_PORT;
use roost_proto::agent::muxer::HandshakeError;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// Serves `uds_path` like the VMM: only `AGENT_PORT` has a guest listener (`guest_socket`).
fn fake_muxer(uds_path: &Path, guest_socket: PathBuf) -> tokio::task::JoinHandle<()> {
    let listener = UnixListener::bind(uds_path).unwrap();
    tokio::spawn(async move {
        let mut host_port = 1u32 << 30;
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            host_port += 1;
            let guest_socket = guest_socket.clone();
            tokio::spawn(async move {
                let mut host = BufReader::new(stream);
                let mut line = String::new();
                if host.read_line(&mut line).await.is_err() {
                    return;
                }
                let port = line
                    .strip_prefix("CONNECT ")
                    .and_then(|p| p.trim_end().parse::<u32>().ok());
                if port != Some(AGENT_PORT) {
                    return; // nothing listens there: hang up
                }
                let Ok(mut guest) = UnixStream::connect(&guest_socket).await else {
                    return;
                };
                let mut host = host.into_inner();
                host.write_all(format!("OK {host_port}\n").as_bytes())
                    .await
                    .unwrap();
                let _ = tokio::io::copy_bidirectional(&mut host, &mut guest).await;
            });
        }
    })
}

#[tokio::test]
async fn ready_exec_and_refusals_through_the_vsock_muxer() {
    let dir = tempfile::tempdir().unwrap();
    let uds = dir.path().join("vm.sock");
    let guest_socket = dir.path().join("guest-1025.sock");
    // The worker listens for the hello before the VM boots.
    let ready = ReadyListener::for_vm(&uds).unwrap();
    assert_eq!(ready.path(), dir.path().join("vm.sock_1024"));
    let mut agent = Command::new(agent_binary())
        .arg("channel")
        .arg("--listen-unix")
        .arg(&guest_socket)
        .arg("--announce-unix")
        .arg(ready.path())
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let hello = ready.accept_hello(Duration::from_secs(20)).await;
    let muxer = fake_muxer(&uds, guest_socket);

    let client = AgentClient::new(Connector::vm(&uds));
    let result = async {
        let hello = hello.unwrap();
        assert_eq!(client.hello().await.unwrap(), hello);
        let output = client.run(exec_argv(["echo", "via vsock"])).await.unwrap();
        assert_eq!(output.stdout, b"via vsock\n");

        let wrong_port = AgentClient::new(Connector::VsockMuxer {
            uds_path: uds.clone(),
            port: 4242,
        });
        let error = wrong_port.hello().await.unwrap_err();
        assert!(
            matches!(
                error,
                Error::Handshake {
                    source: HandshakeError::Refused(_),
                    ..
                }
            ),
            "{error:?}"
        );
    };
    tokio::time::timeout(Duration::from_secs(60), result)
        .await
        .expect("the muxer test finishes");
    muxer.abort();
    let _ = agent.kill();
    let _ = agent.wait();
    drop(ready);
    assert!(
        !dir.path().join("vm.sock_1024").exists(),
        "the ready listener removes its socket"
    );
}
