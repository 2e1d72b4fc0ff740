"""The official `e2b-code-interpreter` SDK against `roost-agent interpreter`.

Run by tests/sdk_interpreter.rs, which starts the interpreter on :49999 and sets
E2B_DEBUG=true: the SDK then skips the control plane and talks to localhost:49999 directly.
"""

import base64
import os
import time

import pytest
from e2b import NotFoundException, TimeoutException
from e2b_code_interpreter import Sandbox

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sandbox():
    assert os.environ.get("E2B_DEBUG") == "true", "run through tests/sdk_interpreter.rs"
    return Sandbox.create()


def test_state_survives_between_runs(sandbox):
    first = sandbox.run_code("roost_x = 40\nroost_x + 1")
    assert first.error is None
    assert first.text == "41"
    second = sandbox.run_code("roost_x += 2\nroost_x")
    assert second.text == "42"
    assert second.execution_count == first.execution_count + 1


def test_matplotlib_figure_is_a_png_result(sandbox):
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\n"
        "plt.title('roost')\n"
        "plt.show()"
    )
    assert execution.error is None
    pngs = [r for r in execution.results if r.png]
    assert len(pngs) == 1, execution.results
    assert not pngs[0].is_main_result
    image = base64.b64decode(pngs[0].png)
    assert image.startswith(PNG_MAGIC)
    assert len(image) > 1000


def test_figure_left_at_the_end_of_a_cell_is_shown_too(sandbox):
    execution = sandbox.run_code(
        "import matplotlib.pyplot as plt\nfig, ax = plt.subplots()\nax.bar(['a', 'b'], [3, 5])"
    )
    assert any(r.png for r in execution.results), execution.results


def test_rich_results_carry_html_and_text(sandbox):
    execution = sandbox.run_code(
        "import pandas as pd\npd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})"
    )
    assert execution.error is None
    [main] = [r for r in execution.results if r.is_main_result]
    assert "<table" in main.html
    assert "a" in main.text and "b" in main.text


def test_errors_come_back_with_name_value_and_traceback(sandbox):
    seen = []
    execution = sandbox.run_code(
        "def roost_divide(a):\n    return a / 0\nroost_divide(1)", on_error=seen.append
    )
    assert execution.error is not None
    assert execution.error.name == "ZeroDivisionError"
    assert execution.error.value == "division by zero"
    assert "roost_divide" in execution.error.traceback
    assert "\x1b[" not in execution.error.traceback, "no ANSI colours"
    assert seen == [execution.error]
    # The kernel is fine afterwards.
    assert sandbox.run_code("1 + 1").text == "2"


def test_stdout_and_stderr_reach_the_callbacks_in_order(sandbox):
    stdout, stderr = [], []
    execution = sandbox.run_code(
        "import sys, time\n"
        "print('out one', flush=True)\n"
        "print('err one', file=sys.stderr, flush=True)\n"
        "time.sleep(0.2)\n"
        "print('out two', flush=True)",
        on_stdout=stdout.append,
        on_stderr=stderr.append,
    )
    assert execution.error is None
    assert "".join(m.line for m in stdout) == "out one\nout two\n"
    assert "".join(m.line for m in stderr) == "err one\n"
    assert all(not m.error for m in stdout) and all(m.error for m in stderr)
    assert stdout[0].timestamp <= stdout[-1].timestamp
    assert abs(stdout[0].timestamp / 1e9 - time.time()) < 60
    assert execution.logs.stdout == [m.line for m in stdout]


def test_env_vars_apply_to_one_execution_only(sandbox):
    sandbox.run_code("import os\nos.environ['ROOST_KEEP'] = 'original'")
    inside = sandbox.run_code(
        "import os\nprint(os.environ['ROOST_NEW'], os.environ['ROOST_KEEP'])",
        envs={"ROOST_NEW": "it's \"new\"", "ROOST_KEEP": "overridden"},
    )
    assert inside.error is None, inside.error
    assert inside.logs.stdout == ["it's \"new\" overridden\n"]
    after = sandbox.run_code(
        "import os\nprint(os.environ.get('ROOST_NEW'), os.environ['ROOST_KEEP'])"
    )
    assert after.logs.stdout == ["None original\n"]


def test_a_timeout_interrupts_the_cell_and_the_context_stays_usable(sandbox):
    sandbox.run_code("roost_before = 'kept'")
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sandbox.run_code("import time\ntime.sleep(120)", timeout=2)
    assert time.monotonic() - started < 30
    started = time.monotonic()
    execution = sandbox.run_code("roost_before")
    assert execution.text == "kept"
    assert time.monotonic() - started < 15, "the interrupted cell must not block the context"


def test_contexts_create_list_restart_delete(sandbox):
    # A directory made by the sandbox itself, so the test also works against a real guest.
    made = sandbox.run_code("import tempfile\ntempfile.mkdtemp(prefix='roost-ctx-')")
    tmp_path = made.text
    assert tmp_path and tmp_path.startswith("/"), made
    context = sandbox.create_code_context(cwd=tmp_path)
    assert context.language == "python"
    assert context.cwd == tmp_path
    assert context.id in [c.id for c in sandbox.list_code_contexts()]

    assert sandbox.run_code("import os\nos.getcwd()", context=context).text == tmp_path
    sandbox.run_code("roost_ctx = 'mine'", context=context)
    assert sandbox.run_code("roost_ctx", context=context).text == "mine"
    # Contexts are separate kernels.
    other = sandbox.run_code("'roost_ctx' in globals()")
    assert other.text == "False"

    sandbox.restart_code_context(context)
    lost = sandbox.run_code("roost_ctx", context=context)
    assert lost.error is not None and lost.error.name == "NameError"

    sandbox.remove_code_context(context)
    assert context.id not in [c.id for c in sandbox.list_code_contexts()]
    with pytest.raises(NotFoundException):
        sandbox.run_code("1", context=context)
    with pytest.raises(NotFoundException):
        sandbox.remove_code_context(context.id)


def test_language_python_uses_the_default_context(sandbox):
    sandbox.run_code("roost_default = 7")
    assert sandbox.run_code("roost_default", language="python").text == "7"


def test_the_async_sdk_works_too():
    import asyncio

    from e2b_code_interpreter import AsyncSandbox

    async def main():
        sandbox = await AsyncSandbox.create()
        seen = []

        async def on_stdout(message):
            seen.append(message.line)

        execution = await sandbox.run_code(
            "print('async hello')\n6 * 7", on_stdout=on_stdout
        )
        context = await sandbox.create_code_context()
        listed = [c.id for c in await sandbox.list_code_contexts()]
        await sandbox.remove_code_context(context)
        return execution, seen, context, listed

    execution, seen, context, listed = asyncio.run(main())
    assert execution.text == "42"
    assert seen == ["async hello\n"]
    assert context.id in listed
