"""Conversations (seed 000's agent playground): threads of messages with one agent.

Posting a user message stores it and queues the agent's reply as a task execution outside
any workflow (task_type "conversation"), so a reply gets what every task gets: attempts,
retries, timeouts, lost-worker recovery, tokens and cost. Each attempt writes the messages
it produced (tool calls and their results, then the reply, or an error message) linked to
itself, its assistant turns naming the prompt version (system prompt and tools) the agent ran
with; the thread's history, as the agent sees it on the next turn, leaves out the
messages of attempts that did not succeed.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from typing import Any

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q

from orchestration.db import database_now
from orchestration.errors import ConversationBusy, ConversationError, ConversationTaken, TransitionError
from orchestration.event_types import EntityType, EventType
from orchestration.models import Agent, AgentPlaygroundMessage, AgentPromptVersion, Priority, TaskAttempt, TaskExecution
from orchestration.runtime.context import Conversation, TaskContext, Usage
from orchestration.selectors import conversation_thread
from orchestration.services.dispatch import tasks_queue
from orchestration.services.events import event_record

TASK_TYPE = "conversation"
# Events an agent records while it works on a task whose payload holds what it worked on: a
# tool call's input and result, a hand-off's message.
CONTENT_EVENTS = (EventType.TOOL_EXECUTED, EventType.AGENT_INTERACTION)
INSTANCE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,254}$")
Role = AgentPlaygroundMessage.Role


def _thread_lock(instance_id: str) -> None:
    """Serialise posts to one thread. On SQLite every transaction begins IMMEDIATE (see the
    settings), which takes the database's write lock before the first read."""
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 7))", [f"conversation:{instance_id}"])


INSTANCE_ID_RULE = "use 1-255 letters, digits, '.', '_', ':' or '-', starting with a letter or digit"


def instance_id_check(instance_id: Any) -> None:
    """ConversationError unless `instance_id` can name a conversation."""
    if not isinstance(instance_id, str) or not INSTANCE_ID.match(instance_id):
        raise ConversationError(f"instance_id: {INSTANCE_ID_RULE}")


def _validate(*, agent: Agent, instance_id: str, content: Any) -> str:
    instance_id_check(instance_id)
    if not isinstance(content, str) or not content.strip():
        raise ConversationError("content: a message needs some text")
    if "\x00" in content:
        raise ConversationError("content: must not contain NUL (\\x00) characters")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: what a line that is not UTF-8 reads as (chat's stdin)
        raise ConversationError("content: is not valid text (an unpaired UTF-16 surrogate; is it UTF-8?)") from None
    if len(content) > settings.CONVERSATION_MAX_MESSAGE_CHARS:
        raise ConversationError(
            f"content: {len(content)} characters; the limit is {settings.CONVERSATION_MAX_MESSAGE_CHARS}"
        )
    if agent.status != Agent.Status.ACTIVE:
        raise ConversationError(f"agent {agent.id!r} is {agent.status}")
    return content


@transaction.atomic
def conversation_message_post(
    *, agent: Agent, instance_id: str, content: str, owner: Any = None, idempotency_key: str | None = None
) -> AgentPlaygroundMessage:
    """Store a user message in the thread `instance_id` and queue the agent's reply.

    A thread belongs to one agent and one owner; while a reply is pending, the next message
    is refused (the agent answers one message at a time, in order). `idempotency_key` is
    stored with the message, unique per owner (api/idempotency.py looks it up)."""
    content = _validate(agent=agent, instance_id=instance_id, content=content)
    _thread_lock(instance_id)
    first = conversation_thread(instance_id=instance_id)
    if first is not None:
        if first["owner_id"] != getattr(owner, "pk", None):
            raise ConversationTaken(
                f"the conversation id {instance_id!r} is taken by another user's conversation; "
                "start yours under another id"
            )
        if first["agent_id"] != agent.id:
            raise ConversationError(
                f"conversation {instance_id!r} is with agent {first['agent_id']!r}, not {agent.id!r}"
            )
    last_asked = (
        AgentPlaygroundMessage.objects.filter(instance_id=instance_id, role=Role.USER, execution__isnull=False)
        .order_by("-created_at", "-message_id")
        .values("message_id", "execution_id", "execution__status")
        .first()
    )
    if last_asked is not None and last_asked["execution__status"] not in TaskExecution.TERMINAL_STATUSES:
        raise ConversationBusy(
            f"conversation {instance_id!r} is still answering message {last_asked['message_id']!r} "
            f"(task {last_asked['execution_id']}); wait for the reply, or cancel that task"
        )
    message = AgentPlaygroundMessage.objects.create(
        instance_id=instance_id,
        agent=agent,
        owner=owner,
        role=Role.USER,
        content=content,
        idempotency_key=idempotency_key,
        created_at=database_now(),
    )
    task = TaskExecution.objects.create(
        agent=agent,
        task_name=f"reply to {message.message_id}",
        task_type=TASK_TYPE,
        priority=Priority.HIGH,  # a person is waiting
        input_data={"instance_id": instance_id, "message_id": message.message_id, "message": content},
        max_retries=settings.CONVERSATION_MAX_RETRIES,
        timeout_seconds=settings.CONVERSATION_TIMEOUT_SECONDS,
        metadata={"instance_id": instance_id},
    )
    message.execution = task
    message.save(update_fields=["execution"])
    event_record(
        event_type=EventType.MESSAGE_CREATED,
        entity_type=EntityType.CONVERSATION,
        entity_id=instance_id,
        agent_id=agent.id,
        session_id=instance_id,
        payload={"message_id": message.message_id, "role": Role.USER, "execution_id": task.execution_id},
    )
    tasks_queue([task], now=message.created_at)  # the database's clock, as the queue timeout's
    return message


def is_conversation_reply(*, workflow_id: str | None, task_type: str) -> bool:
    """Whether a task is the reply to a conversation message (conversation_message_post makes
    one outside any workflow): its input is the user's message, its output the agent's reply.
    A workflow task may name any task_type (conversation_for_task)."""
    return workflow_id is None and task_type == TASK_TYPE


def event_holds_conversation(*, event_type: str, workflow_id: str | None, payload: dict[str, Any] | None) -> bool:
    """Whether an event is one of CONTENT_EVENTS recorded by a conversation's reply task: its
    payload holds the conversation (the user's message, what the agent made of it). Such a
    task is the only one outside any workflow; the event names it by its execution_id, and
    stays when retention has deleted it."""
    return event_type in CONTENT_EVENTS and workflow_id is None and bool((payload or {}).get("execution_id"))


def _question(task: TaskExecution) -> AgentPlaygroundMessage | None:
    """The message a conversation reply task answers; None for any other task (a workflow task
    may name any task_type and any input), or when the message is gone."""
    if task.task_type != TASK_TYPE or task.workflow_id is not None:
        return None
    message = AgentPlaygroundMessage.objects.filter(pk=(task.input_data or {}).get("message_id")).first()
    if message is None or message.execution_id != task.execution_id:
        return None
    return message


def conversation_attempt_closed(task: TaskExecution, *, attempt: TaskAttempt | None, error: str) -> None:
    """In a conversation: the error message of a reply attempt closed without a record of its
    own (its worker lost, its process killed at the hard limit, cancelled, timed out in the
    queue), or of a reply cancelled before it ran. The thread then says what became of the
    question, as a failed attempt's own error message does; what the attempt had said (its
    tool calls) died with its process."""
    question = _question(task)
    if question is None:
        return
    AgentPlaygroundMessage.objects.create(
        instance_id=question.instance_id,
        agent_id=task.agent_id,
        owner_id=question.owner_id,
        execution_id=task.execution_id,
        attempt=attempt,
        role=Role.ASSISTANT,
        content=error,
        is_error=True,
        input_tokens=attempt.input_tokens if attempt else 0,
        output_tokens=attempt.output_tokens if attempt else 0,
        tokens_used=attempt.tokens_used if attempt else 0,
        metadata={"cost_usd": str(attempt.cost_usd if attempt else 0)},
        created_at=database_now(),
    )


def conversation_attempt_usage_sync(attempt_id: int) -> None:
    """Spend added to a reply attempt after it was closed from outside (a bill that arrived
    after a cancel or the reaper's close): the thread's error message for that close says what
    the attempt cost, as a recorded reply does, so it takes the attempt's usage again. In the
    caller's transaction, which holds the attempt's row."""
    usage = (
        TaskAttempt.objects.filter(pk=attempt_id)
        .values("input_tokens", "output_tokens", "tokens_used", "cost_usd")
        .first()
    )
    if usage is None:
        return
    for message in AgentPlaygroundMessage.objects.filter(attempt_id=attempt_id, role=Role.ASSISTANT, is_error=True):
        message.input_tokens = usage["input_tokens"]
        message.output_tokens = usage["output_tokens"]
        message.tokens_used = usage["tokens_used"]
        message.metadata = {**(message.metadata or {}), "cost_usd": str(usage["cost_usd"])}
        message.save(update_fields=["input_tokens", "output_tokens", "tokens_used", "metadata"])


def conversation_retry_check(task: TaskExecution) -> None:
    """A conversation reply may be retried only while its question is the thread's latest
    (taking the thread's lock, as a post does): a later answer would land after the newer
    turns, answer a question the thread has moved past, and could run beside their replies."""
    message = _question(task)
    if message is None:
        return
    _thread_lock(message.instance_id)
    later = (
        AgentPlaygroundMessage.objects.filter(instance_id=message.instance_id, role=Role.USER)
        .filter(
            Q(created_at__gt=message.created_at) | Q(created_at=message.created_at, message_id__gt=message.message_id)
        )
        .exists()
    )
    if later:
        raise TransitionError(
            f"task {task.execution_id} answers message {message.message_id!r}, and conversation "
            f"{message.instance_id!r} has moved on since; post the question again instead"
        )


def as_chat_message(message: AgentPlaygroundMessage) -> dict[str, Any]:
    """A stored message in OpenAI's chat shape."""
    if message.role == Role.TOOL:
        return {"role": "tool", "tool_call_id": message.tool_call_id or "", "content": message.content}
    chat: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.role == Role.ASSISTANT and message.tool_calls:
        chat["tool_calls"] = message.tool_calls
        chat["content"] = message.content or None
    return chat


def _history_messages(*, instance_id: str, up_to: AgentPlaygroundMessage) -> list[AgentPlaygroundMessage]:
    messages = list(
        AgentPlaygroundMessage.objects.filter(instance_id=instance_id, is_error=False)
        .filter(Q(attempt__isnull=True) | Q(attempt__status=TaskAttempt.Status.SUCCEEDED))
        .filter(Q(created_at__lt=up_to.created_at) | Q(created_at=up_to.created_at, message_id__lte=up_to.message_id))
        .order_by("-created_at", "-message_id")[: settings.CONVERSATION_HISTORY_MESSAGES]
    )
    messages.reverse()
    # A window starts at a user message: tool replies cut from their call cannot be sent, and
    # a leading assistant turn is refused by Anthropic ("first message must use the user
    # role"); with alternating turns and an even CONVERSATION_HISTORY_MESSAGES (200) every
    # full window would start with one.
    while messages and messages[0].role != Role.USER:
        messages.pop(0)
    return messages


def conversation_history(*, instance_id: str, up_to: AgentPlaygroundMessage) -> list[dict[str, Any]]:
    """The thread as the agent sees it: messages up to and including `up_to`, without error
    messages and without messages of attempts that did not succeed, oldest first."""
    return [as_chat_message(m) for m in _history_messages(instance_id=instance_id, up_to=up_to)]


def conversation_for_task(task: TaskExecution) -> Conversation | None:
    """The conversation turn a task answers, or None for an ordinary task."""
    # Only the reply task that conversation_message_post made for the message: a workflow
    # task may name any task_type and any input, and must not read or write a thread.
    if task.task_type != TASK_TYPE or task.workflow_id is not None:
        return None
    message_id = (task.input_data or {}).get("message_id")
    message = AgentPlaygroundMessage.objects.filter(pk=message_id).first()
    if message is not None and message.execution_id != task.execution_id:
        return None
    if message is None:
        instance_id = (task.metadata or {}).get("instance_id", "")
        return Conversation(instance_id=instance_id, message_id=str(message_id), history=[], missing=True)
    history = _history_messages(instance_id=message.instance_id, up_to=message)
    return Conversation(
        instance_id=message.instance_id,
        message_id=message.message_id,
        history=[as_chat_message(m) for m in history],
        history_from=history[0].message_id if history else None,
    )


def prompt_version_record(prompt: dict[str, Any]) -> str:
    """Store `prompt` ({"system_prompt", "tools"}) as an AgentPromptVersion unless it already
    is one; returns its key, the sha256 of its canonical JSON. ON CONFLICT DO NOTHING: replies
    under the same prompt, recorded at the same time, do not fail on each other's row."""
    system_prompt, tools = prompt.get("system_prompt") or "", prompt.get("tools") or []
    canonical = json.dumps(
        {"system_prompt": system_prompt, "tools": tools}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    sha256 = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    AgentPromptVersion.objects.bulk_create(
        [AgentPromptVersion(sha256=sha256, system_prompt=system_prompt, tools=tools)], ignore_conflicts=True
    )
    return sha256


def _reply_text(output: dict[str, Any]) -> str:
    content = output.get("content")
    if isinstance(content, str):
        return content
    return json.dumps(output, sort_keys=True, ensure_ascii=False)


@transaction.atomic
def conversation_turn_record(
    *,
    context: TaskContext,
    attempt_id: int,
    output: dict[str, Any] | None,
    error: str | None,
    usage: Usage,
) -> list[AgentPlaygroundMessage]:
    """Store what one attempt said in the thread: its tool calls and results, then the reply
    (or, when the attempt failed, an error message). All rows link to the attempt."""
    conversation = context.conversation
    if conversation is None:
        return []
    # The question may have been deleted (retention) since the claim: the reply still stands.
    owner_id = (
        AgentPlaygroundMessage.objects.filter(pk=conversation.message_id).values_list("owner_id", flat=True).first()
    )
    base = database_now()
    common = {
        "instance_id": conversation.instance_id,
        "agent_id": context.agent_id,
        "owner_id": owner_id,
        "execution_id": context.execution_id,
        "attempt_id": attempt_id,
    }
    # What the agent ran with, named on each of its turns (see AgentPromptVersion); none when
    # the attempt failed before the executor set it.
    ran_with = {"prompt_version": prompt_version_record(conversation.prompt)} if conversation.prompt else {}
    # And where the history it was sent began (CONVERSATION_HISTORY_MESSAGES back, at a user
    # message): the chat export starts a turn's context there, whatever the setting is later.
    if conversation.history_from:
        ran_with["history_from"] = conversation.history_from
    rows = []
    for item in conversation.transcript:
        rows.append(
            AgentPlaygroundMessage(
                role=item["role"],
                content=item.get("content") or "",
                tool_calls=item.get("tool_calls"),
                tool_call_id=item.get("tool_call_id"),
                metadata=dict(ran_with) if item["role"] == Role.ASSISTANT else {},
                **common,
            )
        )
    final = AgentPlaygroundMessage(
        role=Role.ASSISTANT,
        content=_reply_text(output or {}) if error is None else error,
        is_error=error is not None,
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        tokens_used=usage.tokens,
        metadata={
            "cost_usd": str(usage.cost_usd),
            **({"model": output["model"]} if output and "model" in output else {}),
            **ran_with,
        },
        **common,
    )
    if error is None and output and output.get("tool_calls"):
        final.tool_calls = output["tool_calls"]
    rows.append(final)
    # Strictly increasing timestamps from the database clock keep the thread in order.
    for i, row in enumerate(rows):
        row.created_at = base + dt.timedelta(microseconds=i)
    AgentPlaygroundMessage.objects.bulk_create(rows)
    event_record(
        event_type=EventType.MESSAGE_CREATED,
        entity_type=EntityType.CONVERSATION,
        entity_id=conversation.instance_id,
        agent_id=context.agent_id,
        session_id=conversation.instance_id,
        payload={
            "message_id": final.message_id,
            "role": Role.ASSISTANT,
            "reply_to": conversation.message_id,
            "execution_id": context.execution_id,
            "attempt": context.attempt_number,
            "messages": len(rows),
            "is_error": error is not None,
        },
        severity="warning" if error is not None else "info",
    )
    return rows
