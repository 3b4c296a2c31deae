import sys
import time
import uuid
from collections import Counter

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from orchestration.errors import ConversationError
from orchestration.management.arguments import DatabaseCommand, seconds, text
from orchestration.management.stopping import INTERRUPTED
from orchestration.models import Agent, AgentPlaygroundMessage, TaskExecution
from orchestration.selectors import conversation_thread
from orchestration.services.conversations import INSTANCE_ID_RULE, conversation_message_post, instance_id_check

Role = AgentPlaygroundMessage.Role


class Command(DatabaseCommand):
    help = (
        "Chat with an agent in the terminal. Each line you type is posted to the conversation "
        "(the agent answers on a Celery worker, like every task); an empty line or EOF ends, with exit "
        "status 1 if a reply did not complete."
    )

    def add_arguments(self, parser):
        parser.add_argument("agent", type=text, help="agent id")
        parser.add_argument("--instance", type=text, help="conversation id to continue (default: a new one)")
        parser.add_argument("--user", type=text, help="username to chat as (the thread's owner)")
        parser.add_argument(
            "--timeout",
            type=seconds(),
            default=None,
            help="seconds to wait for each reply (default: CONVERSATION_TIMEOUT_SECONDS plus retries)",
        )

    def handle(self, *args, **options):
        agent = Agent.objects.filter(pk=options["agent"]).first()
        if agent is None:
            raise CommandError(f"no agent {options['agent']!r} (manage.py load_agents syncs agents/definitions/)")
        owner = None
        if options["user"]:
            owner = get_user_model().objects.filter(username=options["user"]).first()
            if owner is None:
                raise CommandError(f"no user {options['user']!r}")
        instance_id = options["instance"] or f"chat-{uuid.uuid4().hex[:12]}"
        try:
            instance_id_check(instance_id)  # before the user types a first message, not after
        except ConversationError:
            raise CommandError(f"--instance {instance_id!r}: {INSTANCE_ID_RULE}") from None
        self._thread_check(instance_id, agent=agent, owner=owner)
        timeout = options["timeout"] or settings.CONVERSATION_TIMEOUT_SECONDS * (settings.CONVERSATION_MAX_RETRIES + 1)
        interactive = sys.stdin.isatty()
        self.stdout.write(f"conversation {instance_id} with {agent.name} ({agent.id}); an empty line ends")
        interrupted = False
        ended: list[str] = []  # each reply's final status
        try:
            for line in self._lines(interactive):
                if not line.strip():
                    break
                try:
                    asked = conversation_message_post(agent=agent, instance_id=instance_id, content=line, owner=owner)
                except ConversationError as exc:
                    raise CommandError(str(exc)) from None
                for message in self._replies(asked, timeout, ended):
                    self._show(message)
        except KeyboardInterrupt:
            # ^C leaves as an empty line does, at the prompt or while a reply is awaited (its
            # task goes on and is recorded in the thread): it was a traceback.
            self.stdout.write("")
            interrupted = True
        as_user = f" --user {owner.get_username()}" if owner is not None else ""
        self.stdout.write(f"(continue with: manage.py chat {agent.id} --instance {instance_id}{as_user})")
        if interrupted:
            # ^C's status, not 0: a script running chat in a loop stopped at ^C before, by the
            # KeyboardInterrupt; with 0 it went on to the next chat, posting its input again.
            sys.exit(INTERRUPTED)
        unanswered = Counter(status for status in ended if status != TaskExecution.Status.COMPLETED)
        if unanswered:
            # Shown above as it happened; said again in the status, or a script feeding questions
            # in could not tell a failed reply from an answer.
            raise CommandError(
                f"{sum(unanswered.values())} of {len(ended)} repl{'y' if len(ended) == 1 else 'ies'} did not complete ("
                + ", ".join(f"{status} {count}" for status, count in sorted(unanswered.items()))
                + ")"
            )

    def _thread_check(self, instance_id: str, *, agent: Agent, owner) -> None:
        """Refuse a thread this command cannot continue before the first message is typed, and
        say how to continue it (the operator running manage.py may see whose it is)."""
        thread = conversation_thread(instance_id=instance_id)
        if thread is None:
            return
        if thread["owner_id"] != getattr(owner, "pk", None):
            if thread["owner_id"] is None:
                raise CommandError(
                    f"conversation {instance_id!r} was started without --user: continue it without --user"
                )
            username = get_user_model().objects.get(pk=thread["owner_id"]).get_username()
            raise CommandError(f"conversation {instance_id!r} is {username}'s: continue it with --user {username}")
        if thread["agent_id"] != agent.id:
            raise CommandError(f"conversation {instance_id!r} is with agent {thread['agent_id']!r}, not {agent.id!r}")

    def _lines(self, interactive: bool):
        while True:
            if interactive:
                self.stdout.write("you> ", ending="")
                self.stdout.flush()
            line = sys.stdin.readline()
            if not line:
                return
            line = line.rstrip("\n")
            if not interactive:
                self.stdout.write(f"you> {line}")
            yield line

    def _replies(self, asked: AgentPlaygroundMessage, timeout: float, ended: list[str]):
        """Yield the messages of each attempt at answering, until the reply task ends (its status
        appended to `ended`)."""
        deadline = time.monotonic() + timeout
        seen: set[str] = set()
        while True:
            task = TaskExecution.objects.only("status", "error").get(pk=asked.execution_id)
            new = list(
                AgentPlaygroundMessage.objects.filter(execution_id=asked.execution_id)
                .exclude(pk__in=seen)
                .exclude(pk=asked.pk)
                .order_by("created_at", "message_id")
            )
            for message in new:
                seen.add(message.pk)
                yield message
            if task.status in TaskExecution.TERMINAL_STATUSES:
                ended.append(task.status)
                if task.status != TaskExecution.Status.COMPLETED:
                    self.stdout.write(self.style.ERROR(f"(the reply {task.status}: {task.error})"))
                return
            if time.monotonic() > deadline:
                raise CommandError(
                    f"no reply within {timeout:g} s (task {asked.execution_id} is {task.status}); "
                    "is a worker running? (make worker)"
                )
            time.sleep(0.2)

    def _show(self, message: AgentPlaygroundMessage) -> None:
        if message.role == Role.TOOL:
            self.stdout.write(f"  [tool {message.tool_call_id}] {message.content}")
        elif message.tool_calls:
            for call in message.tool_calls:
                function = call.get("function", {})
                self.stdout.write(f"  [calls {function.get('name')}({function.get('arguments')})]")
            if message.content:
                self.stdout.write(f"{message.agent_id}> {message.content}")
        elif message.is_error:
            self.stdout.write(self.style.WARNING(f"{message.agent_id}! {message.content}"))
        else:
            tokens = f"  ({message.tokens_used} tokens)" if message.tokens_used else ""
            self.stdout.write(f"{message.agent_id}> {message.content}{tokens}")
