"""Error types shared by the engine, the agents and the interfaces (API, commands)."""

from __future__ import annotations


class AgentError(Exception):
    """Base for errors an agent raises on purpose."""

    retryable = True


class RetryableError(AgentError):
    """A transient failure (rate limit, 5xx, network): the attempt is retried if retries remain."""

    retryable = True

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PermanentError(AgentError):
    """A failure retrying cannot fix (bad input, 4xx): the task fails at once."""

    retryable = False


# Exceptions that signal a programming or input error: retrying would repeat them. Anything
# else (network errors, timeouts, unknown exceptions) is treated as transient.
NON_RETRYABLE_BUILTINS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    AttributeError,
    NotImplementedError,
    AssertionError,
    ImportError,
    LookupError,
    ArithmeticError,
    SystemExit,  # an agent's own sys.exit(): its code would exit again
)


def is_retryable(exc: BaseException) -> bool:
    if isinstance(exc, AgentError):
        return exc.retryable
    return not isinstance(exc, NON_RETRYABLE_BUILTINS)


# How many problems an answer lists. Every problem is found, but a spec with 50 000 unknown
# dependencies would get an answer ten times its size; past the first ones a count says
# how many more there are.
LISTED_PROBLEMS = 100


def more_problems(count: int) -> str:
    """The line that stands for `count` problems not listed."""
    return f"and {count} more problem{'s' if count != 1 else ''}, not listed"


# The length of task_attempts.error_class (the model's field takes it from here).
ERROR_CLASS_MAX_LENGTH = 255


def error_class_name(exc: BaseException) -> str:
    """`exc`'s class as an attempt records it, module and qualified name, cut to its column, as
    its column takes it: a longer name (a generated class's) made the record itself fail, and so
    did a NUL character or an unpaired surrogate, which a class's __qualname__ and __module__ may
    hold (unlike its __name__)."""
    from orchestration.runtime.tools import storable_text

    return storable_text(f"{type(exc).__module__}.{type(exc).__qualname__}")[:ERROR_CLASS_MAX_LENGTH]


class SpecError(Exception):
    """A workflow spec (or another client input) is invalid. `problems` lists every problem
    found, each naming the field, so a client can fix them all at once; `listed` is what an
    answer shows of them."""

    def __init__(self, problems: list[str]) -> None:
        problems = [_printable(problem) for problem in problems]
        super().__init__("; ".join(problems))
        self.problems = problems

    @property
    def listed(self) -> list[str]:
        """The first LISTED_PROBLEMS problems, then a line counting the rest, if any."""
        if len(self.problems) <= LISTED_PROBLEMS:
            return self.problems
        return [*self.problems[:LISTED_PROBLEMS], more_problems(len(self.problems) - LISTED_PROBLEMS)]


def _printable(text: str) -> str:
    """`text` with each unpaired UTF-16 surrogate spelled as its escape (`\\ud800`). A problem
    quotes what the client sent (a task's name, an unknown field's, the keys on a value's
    path), and a JSON body may hold such a character, which UTF-8 cannot carry: the answer
    that named the problem could not be written."""
    if text.isascii():
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class IdempotencyKeyReused(SpecError):
    """A workflow was submitted under an idempotency key its owner already used for another
    spec: the key names that first workflow, and this spec would silently not run."""

    def __init__(self, key: str, workflow_id: str) -> None:
        super().__init__(
            [
                f"idempotency_key {key!r} was already used for a different spec (workflow {workflow_id}); "
                "use a new key for a new workflow"
            ]
        )
        self.key = key
        self.workflow_id = workflow_id


class TransitionError(Exception):
    """An operation is not allowed in the current state (e.g. retrying a completed task)."""


class ConversationError(ValueError):
    """A conversation message cannot be accepted (empty, too long, or the thread belongs to
    another agent or user). The message says which."""


class ConversationBusy(ConversationError):
    """The thread's agent is still answering its previous message (try again after it)."""


class ConversationTaken(ConversationError):
    """The thread id is another user's conversation (ids are one namespace: choose another)."""


class ToolError(PermanentError):
    """A tool call was refused (unknown tool, not allowed for the agent, invalid arguments)
    or the tool failed; recorded on the tool_executed event and raised to the agent."""
