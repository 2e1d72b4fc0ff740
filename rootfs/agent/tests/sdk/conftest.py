"""Shared pytest set-up for the official-SDK suites (`test_envd*.py`, `test_interpreter*.py`).

The process ends with `os._exit(<pytest's exit status>)` once pytest is done, skipping the
interpreter's finalization. Reason: the e2b SDK's HTTP client (`pyqwest`, a Rust extension
with its own tokio runtime) can still have a runtime thread delivering a streamed response
chunk to an asyncio loop when the interpreter shuts down. CPython 3.11 ends such a thread with
`pthread_exit` from `take_gil`, which cannot unwind through Rust frames and aborts the whole
process (SIGABRT) after every test has passed. Seen under CPU load in about one run in three;
a core dump showed exactly that stack (`PyThread_exit_thread` <- `take_gil` <- `sock_send`
<- `pyqwest::asyncio::runtime::report`). The verdicts are pytest's own and unchanged: a
failing test still makes the exit status non-zero, and a run that never reached the end of
the session (a crash during the tests) exits the normal way.
"""

import atexit
import os
import sys

import pytest

_exit_status = None


@pytest.hookimpl(trylast=True)
def pytest_sessionfinish(session, exitstatus):
    global _exit_status
    _exit_status = int(exitstatus)


def _exit_without_finalization():
    # atexit handlers run before the interpreter starts finalizing, so no thread has been
    # cut off yet; everything pytest printed is flushed first.
    if _exit_status is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)


atexit.register(_exit_without_finalization)
