"""Python agents of the runtime edge-case tests (importable by worker processes)."""

from orchestration.runtime.context import AgentResult, Usage


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
