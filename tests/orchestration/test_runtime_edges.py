"""The agent runtime at its edges: spend of cancelled and killed attempts, results the database
cannot store, hostile HTTP answers, conversation isolation and order, bad agent definitions."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import pytest
from billiard import common as billiard_common
from django.core.management import CommandError, call_command
from django.db import OperationalError, connection, connections
from django.utils import timezone

from orchestration.models import Agent, Event, TaskAttempt, TaskExecution, Workflow
from orchestration.runtime.context import Usage
from orchestration.services import execution
from orchestration.services.execution import Claim, Outcome, attempt_claim, attempt_run
from orchestration.services.workflows import workflow_cancel, workflow_submit
from tests.engine import wait_for
from tests.fakes.servers import OpenAIServer, Reply
from tests.orchestration.edge_agents import edge_agent
from tests.orchestration.test_engine import submit, task
from tests.orchestration.test_executors import ctx

KEY = "sk-test-" + "edges" * 5
# A worker that reaches the local fake servers.
LOCAL_NET = {"AGENT_HTTP_ALLOW_PRIVATE": "true", "AGENT_HTTP_ALLOWED_HOSTS": "127.0.0.1"}


def llm_env(llm: OpenAIServer) -> dict[str, str]:
    """LOCAL_NET, and the key, sent to the fake server's origin (http, its port)."""
    return {**LOCAL_NET, "AGENT_API_KEY_HOSTS": llm.url, "EDGES_LLM_API_KEY": KEY}


def finished(workflow: Workflow, timeout: float = 40) -> Workflow:
    return wait_for(lambda: (w := Workflow.objects.get(pk=workflow.pk)).is_terminal and w, timeout=timeout)


def llm_tool_agent(url: str) -> Agent:
    return Agent.objects.create(
        id="calc-llm",
        name="Calc",
        executor=Agent.Executor.LLM,
        provider="openai",
        url=url,
        model="gpt-4o-mini",
        api_key_env="EDGES_LLM_API_KEY",
        config={"tools": ["calculator"]},
    )


# --- a cancelled attempt's paid model rounds vanish -------------------------------------


@pytest.mark.django_db(transaction=True)
def test_cancel_during_second_model_round_keeps_the_first_rounds_spend_real_worker(engine):
    """Round 1 is answered (1200 + 350 tokens, paid), the tool runs, round 2 hangs; the user
    cancels. The attempt is recorded cancelled: its first round's spend must stay on record."""
    with OpenAIServer(api_key=KEY, tool_call={"expression": "6 * 7"}) as llm:
        engine(env=llm_env(llm))
        llm_tool_agent(llm.base_url)
        llm.script(Reply(), Reply(delay=8))
        workflow, _ = workflow_submit(
            spec={"name": "c", "tasks": [{"name": "calc", "agent": "calc-llm", "input": {"prompt": "6*7?"}}]}
        )
        wait_for(lambda: len(llm.requests) >= 2, timeout=30, what="the second model request")
        workflow_cancel(workflow_id=workflow.pk)
        workflow = finished(workflow)
        time.sleep(2)
    attempt = TaskAttempt.objects.get(execution__workflow=workflow)
    assert attempt.status == TaskAttempt.Status.CANCELLED
    assert attempt.tokens_used >= 1550, "round 1 was paid"
    assert workflow.total_tokens_used >= 1550


# --- an output PostgreSQL cannot store leaves the attempt running --------------------


def closed_by_the_worker(workflow: Workflow) -> TaskAttempt:
    """The workflow's first attempt once closed: by the worker when its try ends, long before the
    reaper's time (it would be left running otherwise, and this times out)."""
    return wait_for(
        lambda: (
            TaskAttempt.objects.filter(execution__workflow=workflow, attempt_number=1)
            .exclude(status=TaskAttempt.Status.RUNNING)
            .first()
        ),
        timeout=30,
        what="the worker to close the attempt (not the reaper)",
    )


@contextlib.contextmanager
def _billiard_terminate_handler(*, close: bool = True) -> Iterator[None]:
    """billiard's own SIGTERM handler, as a pool process has it; after it, the signal's handler
    restored, its flag cleared and (`close`) the connection an interrupted COMMIT left busy
    closed, as the dying process leaves it."""
    previous = signal.signal(signal.SIGTERM, billiard_common._shutdown_cleanup)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        billiard_common.clear_terminate_handler_fired()
        if close:
            connection.close()


def _submit_one(agent_id: str, **task: object) -> Workflow:
    workflow, _ = workflow_submit(
        spec={"name": "one", "tasks": [{"name": "only", "agent": agent_id, "input": {"description": "x"}, **task}]}
    )
    return workflow


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "entrypoint", ["tests.orchestration.edge_agents.nul_output", "tests.orchestration.edge_agents.float_cost"]
)
def test_unstorable_result_fails_the_attempt_instead_of_leaving_it_running(engine, entrypoint):
    engine()
    Agent.objects.create(id="odd", name="Odd", executor=Agent.Executor.PYTHON, entrypoint=entrypoint)
    workflow = _submit_one("odd", max_retries=1)
    wait_for(lambda: TaskAttempt.objects.filter(execution__workflow=workflow).exists(), timeout=20)
    first = closed_by_the_worker(workflow)
    # closed either way: a NUL output fails it, a float cost is recorded as the decimal it is
    assert first.status in (TaskAttempt.Status.FAILED, TaskAttempt.Status.SUCCEEDED), first.error


@pytest.mark.django_db(transaction=True)
def test_an_output_whose_keys_are_one_in_json_fails_the_attempt_instead_of_losing_a_value(engine):
    engine()
    edge_agent("odd", "colliding_keys")
    workflow = finished(_submit_one("odd", max_retries=0))
    only = task(workflow, "only")
    assert (only.status, only.output_data) == (TaskExecution.Status.FAILED, None)
    assert only.error == (
        "PermanentError: agent output cannot be stored: output.counts: keys 1 and '1' are both '1' in JSON "
        "(one value would be lost)"
    )


@pytest.mark.django_db(transaction=True)
def test_an_output_nested_too_deep_to_write_fails_the_attempt_for_good(engine):
    engine()
    edge_agent("odd", "deep_output")
    workflow = finished(_submit_one("odd", max_retries=2))
    attempts = list(TaskAttempt.objects.filter(execution__workflow=workflow))
    assert [(a.status, a.retryable) for a in attempts] == [("failed", False)]
    assert attempts[0].error.startswith(
        "PermanentError: agent output is not JSON-serialisable: maximum recursion depth exceeded"
    )


@pytest.mark.django_db(transaction=True)
def test_agent_service_answering_a_nul_character_is_recorded_not_left_running(engine):

    from tests.fakes.servers import AgentService

    with AgentService() as service:
        engine(env=LOCAL_NET)
        Agent.objects.create(id="svc", name="Svc", executor=Agent.Executor.HTTP, url=service.url)
        service.script(Reply(body={"result": "col1\x00col2", "metadata": {"tokens_used": 10}}))
        workflow = _submit_one("svc", max_retries=1)
        wait_for(lambda: service.requests, timeout=20)
        first = closed_by_the_worker(workflow)
    assert first.status == TaskAttempt.Status.FAILED and "NUL" in (first.error or "")


# --- a workflow task typed "conversation" reads and writes another user's thread ------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("limit", [None, 4], ids=["fast-path-off", "agent-with-max-concurrency"])
def test_workflow_task_cannot_borrow_someone_elses_conversation(settings, builtin_agents, limit):
    from unittest import mock

    from django.contrib.auth import get_user_model

    from orchestration.models import AgentPlaygroundMessage
    from orchestration.services.conversations import conversation_message_post

    if limit is None:
        settings.ENGINE_FAST_PATH = False
    else:
        Agent.objects.filter(pk="echo").update(max_concurrency=limit)
    users = get_user_model()
    alice = users.objects.create_user("alice")
    mallory = users.objects.create_user("mallory")
    with mock.patch("orchestration.services.dispatch.dispatch_send"):
        secret = conversation_message_post(
            agent=Agent.objects.get(pk="assistant"),
            instance_id="alice-private",
            content="my salary is 123456",
            owner=alice,
        )
        spec = {
            "name": "peek",
            "tasks": [
                {
                    "name": "peek",
                    "agent": "echo",
                    "task_type": "conversation",
                    "input": {"message_id": secret.message_id},
                },
            ],
        }
        from orchestration.errors import SpecError

        with pytest.raises(SpecError, match="reserved"):
            workflow_submit(spec=spec, owner=mallory)
        # defence in depth: a workflow task typed "conversation" (older rows) is still no reply
        spec["tasks"][0]["task_type"] = "peek"
        workflow, _ = workflow_submit(spec=spec, owner=mallory)
        TaskExecution.objects.filter(workflow=workflow).update(task_type="conversation")
    task = TaskExecution.objects.get(workflow=workflow)
    attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@x")
    task.refresh_from_db()
    leaked = "123456" in str(task.output_data)
    written = list(
        AgentPlaygroundMessage.objects.filter(instance_id="alice-private", execution=task).values_list(
            "role", "owner_id"
        )
    )
    assert not leaked, "mallory's workflow output contains alice's private conversation"
    assert not written, "mallory's workflow wrote into alice's thread"


# --- load_agents and values the database cannot store --------------------------------

ECHO = "executor: python\nentrypoint: orchestration.runtime.builtin.echo\n"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("metadata:\n  released: 2024-01-01\n", "metadata"),
        ("metadata:\n  weight: .inf\n", "metadata"),
        ("max_concurrency: 10000000000\n", "max_concurrency"),
        ('description: "a\\0b"\n', "description"),
    ],
    ids=["yaml-date", "infinity", "int-out-of-range", "nul-char"],
)
def test_load_agents_bad_value_names_file_and_field_and_loads_nothing(tmp_path: Path, body, field):
    (tmp_path / "good.yaml").write_text("name: Good\n" + ECHO)
    (tmp_path / "bad.yaml").write_text("name: Bad\n" + ECHO + body)
    before = Agent.objects.count()
    with pytest.raises(CommandError) as caught:
        call_command("load_agents", str(tmp_path), stdout=io.StringIO())
    assert "bad.yaml" in str(caught.value) and field in str(caught.value)
    assert Agent.objects.count() == before


# --- a 5xx with a big error page is classified permanent -----------------------------


def test_server_error_with_a_large_error_page_stays_retryable(settings):
    from orchestration.errors import RetryableError
    from orchestration.runtime.executors import agent_execute
    from tests.fakes.servers import AgentService

    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.AGENT_HTTP_MAX_RESPONSE_BYTES = 4096
    context = ctx(workflow_id=None)
    with AgentService() as service:
        service.script(Reply(status=503, body=b"<html>" + b"Service Unavailable " * 1000 + b"</html>"))
        agent = Agent(id="svc", name="S", executor=Agent.Executor.HTTP, url=service.url)
        with pytest.raises(RetryableError, match="HTTP 503"):
            agent_execute(agent=agent, task_input={}, context=context)


# --- retrying an old conversation turn appends its reply after newer turns ------------


@pytest.mark.django_db(transaction=True)
def test_retried_old_turn_does_not_land_after_newer_turns(builtin_agents):
    from unittest import mock

    from orchestration.models import AgentPlaygroundMessage
    from orchestration.services.conversations import conversation_message_post
    from orchestration.services.workflows import task_retry
    from tests.orchestration import edge_agents as edge_agents

    agent = Agent.objects.create(
        id="moody", name="Moody", executor=Agent.Executor.PYTHON, entrypoint="tests.orchestration.edge_agents.moody"
    )

    def answer(message):
        task = TaskExecution.objects.get(pk=message.execution_id)
        attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@x")

    with mock.patch("orchestration.services.dispatch.dispatch_send"):
        edge_agents.BROKEN["on"] = True
        m1 = conversation_message_post(agent=agent, instance_id="t-order", content="first question")
        answer(m1)  # fails for good (PermanentError)
        edge_agents.BROKEN["on"] = False
        m2 = conversation_message_post(agent=agent, instance_id="t-order", content="second question")
        answer(m2)
        from orchestration.errors import TransitionError

        try:
            task_retry(execution_id=m1.execution_id)  # an operator retries the failed reply
        except TransitionError as exc:  # fixed: refused, the thread has moved on
            assert "moved on" in str(exc)
        else:
            m1.refresh_from_db()
            answer(m1)
    thread = list(
        AgentPlaygroundMessage.objects.filter(instance_id="t-order", is_error=False)
        .order_by("created_at", "message_id")
        .values_list("role", "content")
    )
    assert thread[-1] != ("assistant", "answer to 'first question'"), "the reply to M1 is now the thread's last word"


@pytest.mark.django_db(transaction=True)
def test_error_page_with_a_nul_byte_fails_the_attempt_instead_of_leaving_it_running(engine):
    from tests.fakes.servers import AgentService

    with AgentService() as service:
        engine(env=LOCAL_NET)
        Agent.objects.create(id="svc", name="Svc", executor=Agent.Executor.HTTP, url=service.url)
        service.script(Reply(status=400, body=b"bad request\x00\x01 near byte 7"))
        workflow = _submit_one("svc")
        wait_for(lambda: service.requests, timeout=20)
        first = closed_by_the_worker(workflow)
    assert first.status == TaskAttempt.Status.FAILED and "HTTP 400" in first.error


# --- the response-size cap does not bound memory for a compressed answer ---------------


class _Encoded:
    """An agent service answering a gzip-encoded body (layers as given)."""

    def __init__(self, plain: bytes, layers: int):
        import gzip
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body = plain
        for _ in range(layers):
            body = gzip.compress(body)
        encoding = ", ".join(["gzip"] * layers)

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Encoding", encoding)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), H)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_gzip_answer_is_decoded_and_a_nested_encoding_bomb_is_refused_without_inflating_it(settings):
    import tracemalloc

    from orchestration.errors import PermanentError
    from orchestration.runtime.executors import agent_execute

    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.AGENT_HTTP_MAX_RESPONSE_BYTES = 1 << 20
    ok = _Encoded(b'{"result": "fine"}', 1)
    try:
        agent = Agent(id="svc", name="S", executor=Agent.Executor.HTTP, url=ok.url)
        assert agent_execute(agent=agent, task_input={}, context=ctx(workflow_id=None)).output == {"result": "fine"}
    finally:
        ok.close()
    bomb = _Encoded(b"0" * (64 << 20), 2)  # 64 MiB once inflated, sent as a few hundred bytes
    try:
        agent = Agent(id="svc", name="S", executor=Agent.Executor.HTTP, url=bomb.url)
        tracemalloc.start()
        with pytest.raises(PermanentError):
            agent_execute(agent=agent, task_input={}, context=ctx(workflow_id=None))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    finally:
        bomb.close()
    assert peak < 8 << 20, f"{peak >> 20} MiB allocated for an answer capped at 1 MiB"


# --- a long conversation with an Anthropic agent starts its window with an assistant turn --


@pytest.mark.django_db(transaction=True)
def test_anthropic_conversation_keeps_answering_once_the_history_window_is_full(settings, builtin_agents):
    import os
    from unittest import mock

    from orchestration.models import AgentPlaygroundMessage
    from orchestration.services.conversations import conversation_message_post
    from tests.fakes.servers import AnthropicServer

    settings.AGENT_HTTP_ALLOW_PRIVATE = True
    settings.AGENT_HTTP_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.CONVERSATION_HISTORY_MESSAGES = 4  # the default, 200, is even too: same at turn 101
    os.environ["AUDIT_ANTHROPIC_API_KEY"] = KEY
    with AnthropicServer(api_key=KEY) as server:
        settings.AGENT_API_KEY_HOSTS = [server.url]
        agent = Agent.objects.create(
            id="claude",
            name="Claude",
            executor=Agent.Executor.LLM,
            provider="anthropic",
            url=server.url,
            model="claude-3-5-haiku-latest",
            api_key_env="AUDIT_ANTHROPIC_API_KEY",
        )
        outcomes = []
        with mock.patch("orchestration.services.dispatch.dispatch_send"):
            for turn in range(3):
                asked = conversation_message_post(agent=agent, instance_id="long", content=f"question {turn}")
                task = TaskExecution.objects.get(pk=asked.execution_id)
                attempt_run(execution_id=task.pk, celery_task_id=task.celery_task_id, worker="w@x")
                task.refresh_from_db()
                outcomes.append((task.status, (task.error or "")[:120]))
    assert all(status == TaskExecution.Status.COMPLETED for status, _ in outcomes)
    assert AgentPlaygroundMessage.objects.filter(instance_id="long", role="assistant", is_error=False).count() == 3


@pytest.mark.django_db(transaction=True)
def test_killed_worker_keeps_the_paid_rounds_on_the_lost_attempt(engine):
    """The pool process is SIGKILLed during round 2; the reaper closes the attempt as lost:
    round 1 (paid) must stay on the attempt, the task and the workflow."""
    import datetime as dt

    from django.utils import timezone

    from orchestration.services.reaper import attempts_reap

    with OpenAIServer(api_key=KEY, tool_call={"expression": "6 * 7"}) as llm:
        worker = engine(env=llm_env(llm))
        llm_tool_agent(llm.base_url)
        llm.script(Reply(), Reply(delay=8))
        workflow, _ = workflow_submit(
            spec={"name": "k", "tasks": [{"name": "calc", "agent": "calc-llm", "input": {"prompt": "6*7?"}}]}
        )
        wait_for(lambda: len(llm.requests) >= 2, timeout=30, what="the second model request")
        worker.kill()
        attempts_reap(now=timezone.now() + dt.timedelta(seconds=1000))
    attempt = TaskAttempt.objects.get(execution__workflow=workflow)
    task = TaskExecution.objects.get(workflow=workflow)
    workflow.refresh_from_db()
    assert attempt.status == TaskAttempt.Status.LOST
    assert (attempt.tokens_used, task.tokens_used, workflow.total_tokens_used) == (1550, 1550, 1550)


@pytest.mark.django_db(transaction=True)
def test_refused_output_keeps_the_paid_usage(engine):
    """The agent service was paid (metered, 10 tokens) but its output cannot be stored: the
    failed attempt must keep its spend, not overwrite the meter with zero."""
    from tests.fakes.servers import AgentService

    with AgentService() as service:
        engine(env=LOCAL_NET)
        Agent.objects.create(id="svc", name="Svc", executor=Agent.Executor.HTTP, url=service.url)
        service.script(Reply(body={"result": "col1\x00col2", "metadata": {"tokens_used": 10}}))
        workflow = _submit_one("svc", max_retries=0)
        workflow = finished(workflow)
    attempt = TaskAttempt.objects.get(execution__workflow=workflow)
    task = TaskExecution.objects.get(workflow=workflow)
    assert attempt.status == TaskAttempt.Status.FAILED
    assert (attempt.tokens_used, task.tokens_used, workflow.total_tokens_used) == (10, 10, 10)


@pytest.mark.django_db(transaction=True)
def test_model_answer_with_nul_keeps_the_paid_round(engine):
    """A model round was paid (120 tokens, metered) but its answer has a NUL character: the
    failed attempt, its task and its workflow must keep what was paid."""
    body = {
        "id": "x",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a\x00b"}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
    }
    with OpenAIServer(api_key=KEY) as llm:
        engine(env=llm_env(llm))
        llm_tool_agent(llm.base_url)
        llm.script(Reply(body=body))
        workflow = finished(_submit_one("calc-llm", max_retries=0))
    attempt = TaskAttempt.objects.get(execution__workflow=workflow)
    assert attempt.status == TaskAttempt.Status.FAILED
    assert (attempt.tokens_used, workflow.total_tokens_used) == (120, 120)


@pytest.mark.django_db(transaction=True)
def test_token_counts_whose_sum_overflows_fail_the_attempt_not_leave_it_running(engine):
    """Each count fits a bigint, their sum (tokens_used) does not: the attempt must still be
    closed with the reason, not left running for the reaper."""
    from tests.fakes.servers import AgentService

    with AgentService() as service:
        engine(env=LOCAL_NET)
        Agent.objects.create(id="svc", name="Svc", executor=Agent.Executor.HTTP, url=service.url)
        service.script(Reply(body={"result": "ok", "metadata": {"input_tokens": 2**63 - 1, "output_tokens": 1}}))
        workflow = _submit_one("svc", max_retries=0)
        wait_for(lambda: service.requests, timeout=20)
        attempt = closed_by_the_worker(workflow)
    assert attempt.status == TaskAttempt.Status.FAILED, attempt.error


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("ending", ["fails", "succeeds"])
def test_a_try_whose_failure_record_is_refused_for_good_is_recorded_failed_without_its_usage(engine, ending):
    """Each try's cost fits its column (numeric(14, 6), under $1e8); the second one's added to
    the total its task (a retried failure) or workflow (a second task's success) holds does
    not. Its success refused, the failure that said so was refused the same way, and a refused
    failure escaped the worker: the attempt stayed running, for the reaper to take for a hard
    time-out and run the agent again, to be refused again. It is recorded failed for good,
    naming the refusal and the usage left out, and the workflow ends, its totals those of its
    attempts."""
    engine()
    edge_agent("costly", "costly")
    costly = {"agent": "costly", "input": {"cost": "60000000", "fail": ending == "fails"}}
    if ending == "fails":
        workflow = submit({"name": "a", **costly, "max_retries": 1})
    else:
        workflow = submit({"name": "a", **costly}, {"name": "b", **costly, "depends_on": ["a"]})
    workflow = finished(workflow)
    refused = TaskAttempt.objects.get(execution__workflow=workflow, tokens_used=0)
    assert (refused.status, refused.retryable, refused.cost_usd) == ("failed", False, 0)
    assert refused.error_class == "orchestration.errors.PermanentError"
    assert refused.error.startswith(
        "PermanentError: the attempt's failure could not be stored (NumericValueOutOfRange: numeric field overflow"
    )
    assert "it is recorded without its usage (10 input + 5 output tokens, $60000000.000000)" in refused.error
    assert refused.execution.status == TaskExecution.Status.FAILED
    assert refused.execution.error == refused.error
    failed = Event.objects.filter(event_type="task_failed", entity_id=refused.execution_id).get()
    assert failed.payload["error"] == refused.error
    assert workflow.status == Workflow.Status.FAILED
    paid = TaskAttempt.objects.filter(execution__workflow=workflow).exclude(pk=refused.pk).get()
    assert paid.cost_usd == workflow.total_cost_usd == 60_000_000
    assert workflow.total_tokens_used == 15


# --- a cancel's SIGTERM that lands in the COMMIT of the meter's write -------------------


def test_a_cancel_whose_sigterm_lands_in_the_meters_commit_still_stops_the_agent(committed):
    """A cancel revokes the running attempt with terminate=True: the pool process gets SIGTERM,
    whose handler raises SystemExit wherever Python is. Landing in the COMMIT of the meter's
    late-usage transaction (the agent paid again after the cancel closed its attempt), Django's
    atomic() replaced the SystemExit with the ProgrammingError of its `finally` on the busy
    connection ("can't change 'autocommit' now"), which the meter swallowed as a database error:
    the cancelled agent ran on to its end, every later payment unmetered on the broken connection
    ("another command is already in progress"). Seen on a real worker: SIGTERM sent to the pool
    process of an agent metering without pause after its cancel went on in 1 try of 34."""
    wf = submit({"name": "a", "agent": "echo"})
    a = task(wf, "a")
    claim = attempt_claim(execution_id=a.pk, celery_task_id=a.celery_task_id, worker="w@h")
    assert isinstance(claim, Claim)
    workflow_cancel(workflow_id=wf.pk)  # its revoke goes to the broker, which no worker reads here
    meter = execution._meter(claim.attempt.pk)
    meter(Usage(input_tokens=3))  # paid after the cancel: recorded on the closed attempt
    assert TaskAttempt.objects.get(pk=claim.attempt.pk).tokens_used == 3

    wrapper = type(connections["default"])
    commit = wrapper._commit

    def commit_terminated(self):
        signal.raise_signal(signal.SIGTERM)  # the revoke's SIGTERM, as the COMMIT is sent
        return commit(self)

    with (
        _billiard_terminate_handler(),
        mock.patch.object(wrapper, "_commit", commit_terminated),
        pytest.raises(SystemExit),
    ):
        meter(Usage(input_tokens=5))
    attempt = TaskAttempt.objects.get(pk=claim.attempt.pk)
    assert (attempt.status, attempt.tokens_used) == (TaskAttempt.Status.CANCELLED, 3)


# --- a cancel's SIGTERM that lands in the COMMIT of a claim -----------------------------


@pytest.mark.parametrize("billiard", ["flagged", "without-the-flag"])
def test_a_cancel_whose_sigterm_lands_in_the_claims_commit_stops_the_process(committed, billiard):
    """The cancel of a workflow revokes its tasks' messages with terminate=True: a pool process
    claiming one of them then gets SIGTERM, whose handler raises SystemExit wherever Python is.
    Landing in the COMMIT of the claim (which found the task cancelled), Django's atomic()
    replaced the SystemExit with the ProgrammingError of its `finally` on the busy connection,
    and run_task raised it as the task's failure: the process ran on, billiard's flag set, and
    took the next task's agent error for a stop. It ended under that task, which Celery (the
    process marked terminated) acknowledged as revoked: its attempt stayed running with no
    message, until the reaper, past its time limit (the consumer soak's drain, seed 1465621206)."""
    wf = submit({"name": "a", "agent": "echo"})
    a = task(wf, "a")
    workflow_cancel(workflow_id=wf.pk)  # its revoke goes to the broker, which no worker reads here

    wrapper = type(connections["default"])
    commit = wrapper._commit

    def commit_terminated(self):
        signal.raise_signal(signal.SIGTERM)  # the revoke's SIGTERM, as the claim's COMMIT is sent
        return commit(self)

    # Without the flag (a billiard that does not tell whether its handler fired), every SystemExit is a stop.
    flag = (
        mock.patch.object(billiard_common, "terminate_handler_fired", None) if billiard == "without-the-flag" else None
    )
    with (
        _billiard_terminate_handler(),
        flag or contextlib.nullcontext(),
        mock.patch.object(wrapper, "_commit", commit_terminated),
        pytest.raises(SystemExit),
    ):
        attempt_run(execution_id=a.pk, celery_task_id=a.celery_task_id, worker="w@h")
    assert TaskExecution.objects.get(pk=a.pk).status == TaskExecution.Status.CANCELLED
    assert not TaskAttempt.objects.filter(execution_id=a.pk).exists()


# --- a cancel's SIGTERM that lands in a COMMIT after the outcome, or in a beat task's ----


def _terminated_in_commit_of(function: str):
    """A Django `_commit` that raises SIGTERM (the revoke's) as the COMMIT of a transaction run
    under `function` is sent, and commits every other one as it is."""
    commit = type(connections["default"])._commit

    def commit_terminated(self):
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_name != function:
            frame = frame.f_back
        if frame is not None:
            signal.raise_signal(signal.SIGTERM)
        return commit(self)

    return commit_terminated


def test_a_cancel_whose_sigterm_lands_in_the_commit_that_wakes_the_next_in_line_stops_the_process(committed, caplog):
    """Once an attempt of an agent with max_concurrency is recorded, its worker wakes the task
    waiting longest for the freed slot (agent_slot_hand_on), in a transaction of its own. A
    cancel's SIGTERM landing in that COMMIT was replaced by Django's atomic() with "can't change
    'autocommit' now", which the wake swallowed as a database error: the try returned as if
    nothing had happened, and its pool process ran on with billiard's flag set, taking the next
    task's agent error there for a stop (that try left running, its message acked as revoked).
    It stops the process there, not logged as a wake the database failed."""
    Agent.objects.filter(pk="echo").update(max_concurrency=2)
    wf = submit({"name": "a", "agent": "echo", "input": {"n": 1}})
    a = task(wf, "a")
    wrapper = type(connections["default"])
    with (
        _billiard_terminate_handler(),
        mock.patch.object(wrapper, "_commit", _terminated_in_commit_of("agent_slot_hand_on")),
        pytest.raises(SystemExit),
    ):
        attempt_run(execution_id=a.pk, celery_task_id=a.celery_task_id, worker="w@h")
    (attempt,) = TaskAttempt.objects.filter(execution_id=a.pk)
    assert attempt.status == TaskAttempt.Status.SUCCEEDED  # recorded before the wake
    assert "could not be woken" not in caplog.text  # a stop, not a database failure


def test_a_sigterm_that_lands_in_a_commit_of_the_reaper_stops_its_pool_process(committed):
    """The beat's tasks run in the same pool processes as the attempts, and a revoke's SIGTERM
    meant for an attempt reaches whatever its process runs when it arrives. Landing in a COMMIT
    of the reaper (here: a workflow failed past its deadline), Django's atomic() replaced the
    SystemExit with "can't change 'autocommit' now", which skipped_while_away raised as the
    run's failure (not the database away): the process ran on with billiard's flag set, and took
    the next task's agent error there for a stop."""
    from orchestration.tasks import reap_stale_tasks

    wf = submit({"name": "a", "agent": "echo"})
    Workflow.objects.filter(pk=wf.pk).update(deadline=timezone.now() - dt.timedelta(minutes=1))
    wrapper = type(connections["default"])
    with (
        _billiard_terminate_handler(),
        mock.patch.object(wrapper, "_commit", _terminated_in_commit_of("workflows_enforce_deadlines")),
        pytest.raises(SystemExit),
    ):
        reap_stale_tasks()


# --- an agent's own exit, then a database error as its failure is recorded --------------


def test_an_agents_own_exit_then_a_database_error_in_its_record_is_that_error_not_a_stop(committed):
    """An agent's own sys.exit() is its failure (the process lives on). When the record of that
    failure met a database error (here: a lock held past lock_timeout), the error, raised while
    the agent's SystemExit was handled, had it in its context, and stop_if_interrupted took it
    for a terminate signal's exit that Django had replaced: the pool process was stopped, its
    message came back and the try was recorded lost, worker_lost, instead of run_task sending
    its message again with the database error the attempt is closed with."""
    import psycopg

    from tests.engine import database_url
    from tests.orchestration.edge_agents import edge_agent

    edge_agent("exits", "exits")
    wf = submit({"name": "x", "agent": "exits", "input": {"code": 2}})
    a = task(wf, "x")
    with psycopg.connect(database_url()) as other:
        other.execute("SELECT 1 FROM workflows WHERE workflow_id = %s FOR SHARE", [wf.pk])
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '200ms'")
        try:
            with pytest.raises(OperationalError) as raised:
                attempt_run(execution_id=a.pk, celery_task_id=a.celery_task_id, worker="w@h")
        finally:
            connection.close()
    assert "lock timeout" in str(raised.value)
    (attempt,) = TaskAttempt.objects.filter(execution_id=a.pk)
    assert attempt.status == TaskAttempt.Status.RUNNING  # for run_task's retry to close, with the error


def test_an_agents_own_database_error_raised_on_catching_its_interrupt_is_its_failure_not_a_stop(committed):
    """A pool process ignores SIGINT: a KeyboardInterrupt there is the agent's code's own. One
    that the agent caught, then failed in a query of its own while handling it, had the
    KeyboardInterrupt in its database error's context, and process_stopping took the error for a
    stop that Django had replaced: attempt_run raised the KeyboardInterrupt (ending the pool
    process, the try recorded lost) instead of recording the agent's failure."""
    from tests.orchestration.edge_agents import edge_agent

    edge_agent("interrupt-then-query-fails", "interrupt_then_query_fails")
    wf = submit({"name": "i", "agent": "interrupt-then-query-fails"})
    i = task(wf, "i")
    outcome = attempt_run(execution_id=i.pk, celery_task_id=i.celery_task_id, worker="w@h")
    (attempt,) = TaskAttempt.objects.filter(execution_id=i.pk)
    assert (outcome, attempt.status) == (Outcome.FAILED, TaskAttempt.Status.FAILED)
    assert "division by zero" in attempt.error


# --- a cancel's SIGTERM whose SystemExit an agent swallows ------------------------------


def test_a_cancel_whose_exit_the_agent_swallows_still_stops_the_process_once_recorded(committed):
    """billiard's handler raises SystemExit in the agent; one that catches BaseException around
    its work swallows it and answers. Its outcome is recorded (here: succeeded, the cancel not
    committed yet), and the try returned as any other: its pool process ran on with the
    handler's flag set, and took the next task's agent error there for a stop (that try ended
    with its process, unrecorded). The process stops once the outcome is recorded."""
    from tests.orchestration.edge_agents import edge_agent

    edge_agent("swallows-exit", "swallows_exit")
    wf = submit({"name": "s", "agent": "swallows-exit", "input": {"seconds": 20}})
    s = task(wf, "s")
    revoke = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))  # the revoke's SIGTERM
    with _billiard_terminate_handler(close=False):
        revoke.start()
        try:
            with pytest.raises(SystemExit):
                attempt_run(execution_id=s.pk, celery_task_id=s.celery_task_id, worker="w@h")
        finally:
            revoke.cancel()
    (attempt,) = TaskAttempt.objects.filter(execution_id=s.pk)
    assert attempt.status == TaskAttempt.Status.SUCCEEDED
    assert TaskExecution.objects.get(pk=s.pk).output_data == {"interrupted": "SystemExit"}
