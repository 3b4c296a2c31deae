"""Python agents of the runtime edge-case tests (importable by worker processes)."""

from orchestration.runtime.context import AgentResult, Usage


def edge_agent(agent_id: str, function: str):
    """A python agent whose entrypoint is `function` of this module, in the agents table."""
    from orchestration.models import Agent

    return Agent.objects.create(
        id=agent_id,
        name=agent_id.replace("-", " ").capitalize(),
        executor=Agent.Executor.PYTHON,
        entrypoint=f"tests.orchestration.edge_agents.{function}",
    )


def float_cost(task_input, context):
    # A python agent that reports what its own provider call cost, as a float.
    return AgentResult(output={"ok": True}, usage=Usage(input_tokens=100, output_tokens=20, cost_usd=0.0123))


def nul_output(task_input, context):
    return {"text": "binary\x00data"}


BROKEN = {"on": True}


def moody(task_input, context):
    """Answers the last user message; fails while BROKEN is on."""
    from orchestration.errors import PermanentError

    if BROKEN["on"]:
        raise PermanentError("provider down")
    question = task_input["messages"][-1]["content"]
    return {"content": f"answer to {question!r}"}


def held(task_input, context):
    """Pays for a first call at once (metered, as a model's answer is), then, on the attempts in
    `input.hold_attempts`, waits until the file `input.release` exists (at most two minutes);
    reports its whole usage, that call included, with its result."""
    import os
    import time
    from decimal import Decimal

    context.paid(Usage(input_tokens=10, output_tokens=0, cost_usd=Decimal("0.001")))
    if context.attempt_number in task_input.get("hold_attempts", [1]):
        deadline = time.monotonic() + 120
        while not os.path.exists(task_input["release"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    return AgentResult(
        output={"attempt": context.attempt_number},
        usage=Usage(input_tokens=100, output_tokens=20, cost_usd=Decimal("0.0123")),
    )


def paid_after_its_soft_limit(task_input, context):
    """Pays for a first call at once (metered), leaves a second call to a thread of its own,
    and runs past its soft time limit: the thread's call, answered once the file
    `input.release` exists (at most two minutes), is paid after the attempt was recorded
    timed out."""
    import os
    import threading
    import time
    from decimal import Decimal

    context.paid(Usage(input_tokens=10, output_tokens=0, cost_usd=Decimal("0.001")))

    def second_call() -> None:
        deadline = time.monotonic() + 120
        while not os.path.exists(task_input["release"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        context.paid(Usage(input_tokens=100, output_tokens=20, cost_usd=Decimal("0.0123")))

    threading.Thread(target=second_call, daemon=True).start()
    time.sleep(120)


def paid_after_its_close(task_input, context):
    """A model's two rounds, each metered as its answer arrives (as the llm executor meters
    them): the first at once, the second once the file `input.release` exists (at most two
    minutes), meant to come after its attempt was closed without it (a cancel its pool does not
    stop, a soft time-out it runs past in a thread of its own, `input.in_thread`). Reports the
    two rounds as its whole usage as it ends."""
    import os
    import threading
    import time
    from decimal import Decimal

    context.paid(Usage(input_tokens=10, output_tokens=0, cost_usd=Decimal("0.001")))

    def second_round() -> None:
        deadline = time.monotonic() + 120
        while not os.path.exists(task_input["release"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        context.paid(Usage(input_tokens=90, output_tokens=20, cost_usd=Decimal("0.0113")))

    if task_input.get("in_thread"):
        threading.Thread(target=second_round, daemon=True).start()
        time.sleep(120)
    second_round()
    return AgentResult(
        output={"answer": 42}, usage=Usage(input_tokens=100, output_tokens=20, cost_usd=Decimal("0.0123"))
    )


def cancelled_midway(task_input, context):
    """Pays for a first call at once (metered), then its task is cancelled while it runs (a
    user's cancel landing mid-try); it still pays for a second call and ends as `input.end`
    says: `succeed` with a result, or `fail` with a permanent error."""
    from decimal import Decimal

    from orchestration.errors import PermanentError
    from orchestration.services.workflows import task_cancel

    context.paid(Usage(input_tokens=10, output_tokens=0, cost_usd=Decimal("0.001")))
    task_cancel(execution_id=context.execution_id, reason="stopped by the operator")
    spent = Usage(input_tokens=100, output_tokens=20, cost_usd=Decimal("0.0123"))
    if task_input.get("end", "succeed") == "fail":
        error = PermanentError("the provider refused the second call")
        error.usage = spent
        raise error
    return AgentResult(output={"answer": 42}, usage=spent)


def held_then_retryable(task_input, context):
    """Its first try waits until the file `input.release` exists (at most two minutes), then
    fails with a retryable error; later tries succeed."""
    import os
    import time

    from orchestration.errors import RetryableError

    if context.attempt_number == 1:
        deadline = time.monotonic() + 120
        while not os.path.exists(task_input["release"]) and time.monotonic() < deadline:
            time.sleep(0.05)
        raise RetryableError("the provider is busy")
    return {"attempt": context.attempt_number}


def busy_provider(task_input, context):
    """A provider that answers the first attempt "busy, try again in input.retry_after seconds"
    (Retry-After), then succeeds."""
    from orchestration.errors import RetryableError

    if context.attempt_number == 1:
        raise RetryableError("provider busy", retry_after=task_input.get("retry_after", 2))
    return {"attempt": context.attempt_number}


def paid_then_failed(task_input, context):
    """Pays for a provider call (metered, as a model's answer is), then fails without
    attaching the usage to its error."""
    from decimal import Decimal

    from orchestration.errors import PermanentError

    context.paid(Usage(input_tokens=100, output_tokens=20, cost_usd=Decimal("0.0123")))
    raise PermanentError("the provider's answer made no sense")


def paid_slept_then_failed(task_input, context):
    """Pays for a provider call (metered, as a model's answer is), waits `input.seconds`, then
    fails for good without attaching the usage to its error."""
    import time
    from decimal import Decimal

    from orchestration.errors import PermanentError

    context.paid(Usage(input_tokens=100, output_tokens=20, cost_usd=Decimal("0.0123")))
    time.sleep(task_input.get("seconds", 0))
    raise PermanentError("the provider's answer made no sense")


def long_call_id(task_input, context):
    """Calls a tool of its own in a conversation under a call id it chose, longer than the
    thread's tool_call_id column, then answers."""
    result = context.tools.call("calculator", {"expression": "2+2"}, call_id="call_" + "x" * 300)
    return {"content": f"it is {result}"}


def metered(task_input, context):
    """Pays for a first call at once (metered, as a model's answer is), sleeps `input.seconds`,
    then reports its whole usage: with its result, or, on its first `input.fail_times` attempts,
    with a retryable error (the chaos soak's agent with spend)."""
    import time
    from decimal import Decimal

    from orchestration.errors import RetryableError

    context.paid(Usage(input_tokens=10, output_tokens=0, cost_usd=Decimal("0.001")))
    time.sleep(task_input.get("seconds", 0))
    spent = Usage(input_tokens=100, output_tokens=20, cost_usd=Decimal("0.0123"))
    if context.attempt_number <= task_input.get("fail_times", 0):
        error = RetryableError(f"metered: planned failure {context.attempt_number}")
        error.usage = spent
        raise error
    return AgentResult(output={"attempt": context.attempt_number}, usage=spent)


def fails_having_paid(task_input, context):
    """Fails with a retryable error carrying what its provider call cost, given as
    `input.cost`: a float, or the text of a Decimal."""
    from decimal import Decimal

    from orchestration.errors import RetryableError

    cost = task_input["cost"]
    error = RetryableError("the provider timed out after answering")
    error.usage = Usage(input_tokens=100, output_tokens=20, cost_usd=Decimal(cost) if isinstance(cost, str) else cost)
    raise error


def long_error_class(task_input, context):
    """Fails with an exception whose class name (module and qualified name) is longer than the
    attempt's error_class column, as a generated exception class's can be."""
    raise type("Refused" + "X" * 300, (ValueError,), {})("the provider refused the request")


def unstorable_error_class(task_input, context):
    """Fails with an exception whose class's qualified name or module (`input.in`) holds text
    PostgreSQL cannot store (`input.bad`: a NUL, an unpaired surrogate), which both may, unlike
    a class's __name__. The spec refuses such text in the input: the agent makes it."""
    bad = {"nul": "\x00", "surrogate": "\ud800"}[task_input["bad"]]
    refused = type("Refused", (ValueError,), {})
    if task_input["in"] == "module":
        refused.__module__ = f"generated{bad}"
    else:
        refused.__qualname__ = f"Bad{bad}Name"
    raise refused("the provider refused the request")


def costly(task_input, context):
    """Reports `input.cost` USD spent: with its result, or (`input.fail`) with a retryable error."""
    from decimal import Decimal

    from orchestration.errors import RetryableError

    usage = Usage(input_tokens=10, output_tokens=5, cost_usd=Decimal(task_input["cost"]))
    if task_input.get("fail"):
        error = RetryableError("the provider timed out")
        error.usage = usage
        raise error
    return AgentResult(output={"ok": True}, usage=usage)


def cancelled_inside(task_input, context):
    """Fails with asyncio's CancelledError (a BaseException, not an Exception), as an agent
    whose async client's request was cancelled does; succeeds from attempt `input.succeed_on`."""
    import asyncio

    if context.attempt_number < task_input.get("succeed_on", 99):
        raise asyncio.CancelledError("the provider's stream was cancelled")
    return {"attempt": context.attempt_number}


def exits(task_input, context):
    """Calls sys.exit, as a wrapped command-line tool does on an error (argparse exits with 2)."""
    import sys

    sys.exit(task_input.get("code", 2))


def slow_query(task_input, context):
    """Waits `input.seconds` in a query of its own on the platform's database connection (an
    agent reading the record, say): the soft limit interrupts it inside the statement."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(%s)", [task_input.get("seconds", 3)])
    return {"slept": True}


def cleanup_raises(task_input, context):
    """Waits `input.seconds`; its cleanup fails, as a client's close() does on a connection torn
    down while a terminate signal's SystemExit unwinds through it."""
    import time

    try:
        time.sleep(task_input.get("seconds", 20))
    finally:
        raise RuntimeError("cleanup failed")


def swallows_exit(task_input, context):
    """Waits `input.seconds`, catching whatever ends the wait (a terminate signal's SystemExit
    too), and answers, as an agent whose code catches BaseException around its work does."""
    import time

    try:
        time.sleep(task_input.get("seconds", 20))
    except BaseException as exc:  # what such an agent does
        return {"interrupted": type(exc).__name__}
    return {"interrupted": None}


def hands_off(task_input, context):
    """Hands the task to the agent `input.to` (with the rest of its input), and returns its output."""
    to = task_input["to"]
    return context.peers.handoff(to, {k: v for k, v in task_input.items() if k != "to"}, message="over to you")


def interrupt_then_query_fails(task_input, context):
    """Catches a KeyboardInterrupt of its own code's (in a pool process SIGINT is ignored: no ^C
    reaches it) and fails in a query of its own while it handles it: its failure, no stop."""
    from django.db import connection

    try:
        raise KeyboardInterrupt  # a library's way to abandon a call, say
    except KeyboardInterrupt:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 / 0")


def colliding_keys(task_input, context):
    # 1 and "1" are one key in JSON: jsonb would keep only the last value.
    return {"counts": {1: "from the int key", "1": "from the str key"}}


def upstream_names(task_input, context):
    """The names of the upstream outputs it was given, in the order it was given them."""
    return {"names": list(context.upstream)}


def blob(task_input, context):
    """An output of `input.bytes` characters (the audit's parents returned 100 MB each)."""
    return {"blob": "x" * task_input["bytes"]}


def small_sink(task_input, context):
    """A small output naming the upstream tasks it was given."""
    return {"parents": sorted(context.upstream)}


def hands_off_unstorable(task_input, context):
    """Hands work to `flaky` with an input the record cannot store (a NUL character)."""
    return context.peers.handoff("flaky", {"fail_times": 0, "note": "before\x00after"})


def fails_with_nul(task_input, context):
    """Fails for good with a message holding a NUL character (a provider's binary error page)."""
    from orchestration.errors import PermanentError

    raise PermanentError("provider said: bin\x00ary")


def feedback_unstorable(task_input, context):
    """Sends `flaky` feedback whose payload the record cannot store (a NUL character)."""
    context.peers.feedback("flaky", "see the note", payload={"note": "before\x00after"})
    return {"sent": True}


def calls_a_tool_failing_with_nul(task_input, context):
    """Calls its tool `nul_crash` (registered here, in the worker), which fails with a message
    holding a NUL character; returns what it was told (its NUL written as <NUL>)."""
    from orchestration.errors import ToolError
    from orchestration.runtime.tools import registry, tool

    if "nul_crash" not in registry():

        @tool(name="nul_crash", description="Fails.", parameters={"type": "object"})
        def nul_crash() -> None:
            raise ValueError("bin\x00ary")

    try:
        context.tools.call("nul_crash")
    except ToolError as exc:
        return {"told": str(exc).replace("\x00", "<NUL>")}
    return {"told": None}


def hands_off_too_deep(task_input, context):
    """Hands work to `flaky` with an input nested deeper than JSON is written (5 000 lists)."""
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    return context.peers.handoff("flaky", {"fail_times": 0, "nested": nested})


def deep_output(task_input, context):
    """An output nested deeper than JSON is written (5 000 lists)."""
    nested: list = []
    for _ in range(5000):
        nested = [nested]
    return {"nested": nested}


def relays(task_input, context):
    """In a conversation, hands the user's message to echo and answers with its output."""
    return context.peers.handoff("echo", {"text": task_input.get("message", "")}, message=task_input.get("message", ""))
