"""The official `e2b` SDK against `roost-agent serve`.

Run by tests/sdk_envd.rs, which starts the agent on :49983 (default user `user`, default
workdir ROOST_ENVD_ROOT) and sets E2B_DEBUG=true: the SDK then skips the control plane and
talks to localhost:49983 directly.
"""

import hashlib
import io
import os
import time
import uuid

import pytest
from e2b import (
    CommandExitException,
    FileType,
    FilesystemEventType,
    NotFoundException,
    PtySize,
    Sandbox,
    SandboxException,
)

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def sandbox():
    assert os.environ.get("E2B_DEBUG") == "true", "run through tests/sdk_envd.rs"
    return Sandbox.create()


@pytest.fixture
def workdir(sandbox):
    """A fresh directory owned by `user` under the agent's root."""
    path = os.path.join(os.environ["ROOST_ENVD_ROOT"], f"t-{uuid.uuid4().hex[:8]}")
    assert sandbox.files.make_dir(path)
    return path


# --- commands ---------------------------------------------------------------------------


def test_run_captures_stdout_and_stderr(sandbox):
    result = sandbox.commands.run("echo out; echo err >&2")
    assert result.exit_code == 0
    assert result.stdout == "out\n"
    assert result.stderr == "err\n"


def test_non_zero_exit_raises_command_exit_exception(sandbox):
    with pytest.raises(CommandExitException) as raised:
        sandbox.commands.run("echo failing >&2; exit 3")
    assert raised.value.exit_code == 3
    assert raised.value.stderr == "failing\n"


def test_envs_and_cwd(sandbox):
    result = sandbox.commands.run("echo $ROOST_GREETING; pwd", envs={"ROOST_GREETING": "hi there"}, cwd="/tmp")
    assert result.stdout == "hi there\n/tmp\n"


def test_default_cwd_is_the_agent_root(sandbox):
    assert sandbox.commands.run("pwd").stdout.strip() == os.environ["ROOST_ENVD_ROOT"]


def test_missing_cwd_is_an_error(sandbox):
    with pytest.raises(SandboxException):
        sandbox.commands.run("true", cwd="/nonexistent-roost-dir")


def test_user_selection_switches_credentials_and_home(sandbox):
    as_user = sandbox.commands.run("id -un; echo $HOME; id -u")
    name, home, uid = as_user.stdout.split()
    assert (name, home) == ("user", "/home/user")
    assert uid != "0"
    as_root = sandbox.commands.run("id -un; echo $HOME; id -u", user="root")
    assert as_root.stdout.split() == ["root", "/root", "0"]


def test_large_output_arrives_whole(sandbox):
    result = sandbox.commands.run("head -c 3000000 /dev/zero | tr '\\0' 'x'")
    assert len(result.stdout) == 3_000_000


def test_background_list_connect_and_kill(sandbox):
    handle = sandbox.commands.run("sleep 60", background=True)
    assert handle.pid in [p.pid for p in sandbox.commands.list()]
    again = sandbox.commands.connect(handle.pid)
    assert sandbox.commands.kill(handle.pid)
    with pytest.raises(CommandExitException) as raised:
        again.wait()
    assert raised.value.exit_code != 0
    assert "killed" in (raised.value.error or "") or raised.value.exit_code == -1
    assert handle.pid not in [p.pid for p in sandbox.commands.list()]
    assert not sandbox.commands.kill(handle.pid)


def test_send_stdin_to_a_background_command(sandbox):
    handle = sandbox.commands.run("read line; echo got:$line", background=True, stdin=True)
    sandbox.commands.send_stdin(handle.pid, "hello roost\n")
    result = handle.wait()
    assert result.stdout == "got:hello roost\n"


def test_output_callbacks_stream(sandbox):
    chunks = []
    sandbox.commands.run("for i in 1 2 3; do echo line$i; sleep 0.1; done", on_stdout=chunks.append)
    assert "".join(chunks) == "line1\nline2\nline3\n"


def test_pty_create_resize_and_input(sandbox):
    output = bytearray()
    terminal = sandbox.pty.create(PtySize(rows=24, cols=80))
    sandbox.pty.send_stdin(terminal.pid, b"stty size\n")
    time.sleep(0.5)
    sandbox.pty.resize(terminal.pid, PtySize(rows=30, cols=100))
    sandbox.pty.send_stdin(terminal.pid, b"stty size; tty; exit\n")
    terminal.wait(on_pty=output.extend)
    text = output.decode(errors="replace")
    assert "24 80" in text, text
    assert "30 100" in text, text
    assert "/dev/pts/" in text, text


# --- files ------------------------------------------------------------------------------


def test_write_and_read_text_and_bytes(sandbox, workdir):
    info = sandbox.files.write(f"{workdir}/hello.txt", "héllo roost\n")
    assert info.path == f"{workdir}/hello.txt"
    assert sandbox.files.read(f"{workdir}/hello.txt") == "héllo roost\n"
    payload = bytes(range(256)) * 10
    sandbox.files.write(f"{workdir}/nested/dir/blob.bin", payload)
    assert bytes(sandbox.files.read(f"{workdir}/nested/dir/blob.bin", format="bytes")) == payload
    # Written as the default user, so the file belongs to it.
    assert sandbox.files.get_info(f"{workdir}/hello.txt").owner == "user"


def test_write_files_and_octet_stream_upload(sandbox, workdir):
    infos = sandbox.files.write_files(
        [{"path": f"{workdir}/multi/one.txt", "data": "1"}, {"path": f"{workdir}/multi/two.txt", "data": b"22"}]
    )
    assert sorted(i.path for i in infos) == [f"{workdir}/multi/one.txt", f"{workdir}/multi/two.txt"]
    assert sandbox.files.read(f"{workdir}/multi/two.txt") == "22"
    sandbox.files.write(f"{workdir}/octet.txt", "octets", use_octet_stream=True)
    assert sandbox.files.read(f"{workdir}/octet.txt") == "octets"


def test_file_metadata_round_trip(sandbox, workdir):
    info = sandbox.files.write(f"{workdir}/meta.txt", "m", metadata={"Owner": "alice", "stage": "raw"})
    assert info.metadata == {"owner": "alice", "stage": "raw"}
    assert sandbox.files.get_info(f"{workdir}/meta.txt").metadata == {"owner": "alice", "stage": "raw"}
    listed = {e.name: e.metadata for e in sandbox.files.list(workdir)}
    assert listed["meta.txt"] == {"owner": "alice", "stage": "raw"}
    # An overwrite replaces the whole set.
    sandbox.files.write(f"{workdir}/meta.txt", "m2", metadata={"stage": "clean"})
    assert sandbox.files.get_info(f"{workdir}/meta.txt").metadata == {"stage": "clean"}
    sandbox.files.write(f"{workdir}/meta.txt", "m3")
    assert not sandbox.files.get_info(f"{workdir}/meta.txt").metadata


def test_sandbox_reports_running(sandbox):
    assert sandbox.is_running()


def test_relative_paths_resolve_against_the_root(sandbox, workdir):
    name = os.path.relpath(workdir, os.environ["ROOST_ENVD_ROOT"])
    sandbox.files.write(f"{name}/rel.txt", "relative")
    assert sandbox.files.read(f"{workdir}/rel.txt") == "relative"


def test_gzip_upload_and_download(sandbox, workdir):
    sandbox.files.write(f"{workdir}/gz.txt", "compress me " * 1000, gzip=True)
    assert sandbox.files.read(f"{workdir}/gz.txt", gzip=True) == "compress me " * 1000


def test_fifty_mib_stream_round_trip(sandbox, workdir):
    size = 50 * MIB
    data = os.urandom(MIB) * 50
    expected = hashlib.sha256(data).hexdigest()
    sandbox.files.write(f"{workdir}/big.bin", io.BytesIO(data))
    assert sandbox.files.get_info(f"{workdir}/big.bin").size == size
    digest = hashlib.sha256()
    received = 0
    for chunk in sandbox.files.read(f"{workdir}/big.bin", format="stream"):
        digest.update(chunk)
        received += len(chunk)
    assert received == size
    assert digest.hexdigest() == expected

    # The same file as a streamed multipart upload.
    sandbox.files.write(f"{workdir}/big-multipart.bin", io.BytesIO(data), use_octet_stream=False)
    back = sandbox.files.read(f"{workdir}/big-multipart.bin", format="bytes")
    assert hashlib.sha256(back).hexdigest() == expected


def test_list_exists_info_rename_remove(sandbox, workdir):
    assert sandbox.files.make_dir(f"{workdir}/d/e")
    assert not sandbox.files.make_dir(f"{workdir}/d/e")
    sandbox.files.write(f"{workdir}/d/a.txt", "a")
    sandbox.files.write(f"{workdir}/d/e/b.txt", "bb")

    top = sandbox.files.list(f"{workdir}/d")
    assert sorted((e.name, e.type) for e in top) == [("a.txt", FileType.FILE), ("e", FileType.DIR)]
    deep = sandbox.files.list(f"{workdir}/d", depth=2)
    assert sorted(e.path for e in deep) == [f"{workdir}/d/a.txt", f"{workdir}/d/e", f"{workdir}/d/e/b.txt"]

    info = sandbox.files.get_info(f"{workdir}/d/e/b.txt")
    assert (info.name, info.type, info.size) == ("b.txt", FileType.FILE, 2)
    assert info.permissions.startswith("-rw")

    assert sandbox.files.exists(f"{workdir}/d/a.txt")
    moved = sandbox.files.rename(f"{workdir}/d/a.txt", f"{workdir}/d/moved.txt")
    assert moved.path == f"{workdir}/d/moved.txt"
    assert not sandbox.files.exists(f"{workdir}/d/a.txt")

    sandbox.files.remove(f"{workdir}/d")
    assert not sandbox.files.exists(f"{workdir}/d")
    with pytest.raises(NotFoundException):
        sandbox.files.read(f"{workdir}/d/moved.txt")


def test_user_cannot_read_or_write_what_unix_permissions_forbid(sandbox, workdir):
    with pytest.raises(SandboxException):
        sandbox.files.read("/etc/shadow")
    with pytest.raises(SandboxException):
        sandbox.files.write("/root/roost-should-not-exist.txt", "x")
    assert not sandbox.files.exists("/root/roost-should-not-exist.txt", user="root")
    # ...while root may.
    assert "root:" in sandbox.files.read("/etc/shadow", user="root")


def test_watch_dir_reports_events(sandbox, workdir):
    watcher = sandbox.files.watch_dir(workdir)
    sandbox.files.write(f"{workdir}/watched.txt", "1")
    sandbox.files.rename(f"{workdir}/watched.txt", f"{workdir}/renamed.txt")
    sandbox.files.remove(f"{workdir}/renamed.txt")
    deadline = time.time() + 5
    events = []
    while time.time() < deadline:
        events += [(e.name, e.type) for e in watcher.get_new_events()]
        if ("renamed.txt", FilesystemEventType.REMOVE) in events:
            break
        time.sleep(0.1)
    watcher.stop()
    assert ("watched.txt", FilesystemEventType.CREATE) in events, events
    assert ("watched.txt", FilesystemEventType.WRITE) in events, events
    assert ("watched.txt", FilesystemEventType.RENAME) in events, events
    assert ("renamed.txt", FilesystemEventType.REMOVE) in events, events


def test_recursive_watch_sees_subdirectories(sandbox, workdir):
    sandbox.files.make_dir(f"{workdir}/sub")
    watcher = sandbox.files.watch_dir(workdir, recursive=True)
    sandbox.files.write(f"{workdir}/sub/deep.txt", "x")
    deadline = time.time() + 5
    names = set()
    while time.time() < deadline and "sub/deep.txt" not in names:
        names |= {e.name for e in watcher.get_new_events()}
        time.sleep(0.1)
    watcher.stop()
    assert "sub/deep.txt" in names, names


# --- the async client (HTTP streams for WatchDir, its own command path) -----------------


def test_async_client_commands_and_streamed_watch(workdir):
    import asyncio

    from e2b import AsyncSandbox

    async def scenario():
        sandbox = await AsyncSandbox.create()
        result = await sandbox.commands.run("echo async; id -un")
        assert result.stdout == "async\nuser\n"

        events = []
        written = asyncio.Event()

        def on_event(event):
            events.append((event.name, event.type))
            if event.name == "streamed.txt" and event.type == FilesystemEventType.WRITE:
                written.set()

        handle = await sandbox.files.watch_dir(workdir, on_event=on_event)
        await sandbox.files.write(f"{workdir}/streamed.txt", "x")
        await asyncio.wait_for(written.wait(), 5)
        await handle.stop()
        return events

    events = asyncio.run(scenario())
    assert ("streamed.txt", FilesystemEventType.CREATE) in events, events
