"""Built-in agents that do real work offline, through the tools of runtime/toolkit.py (so
every piece of work shows up as a recorded tool call), for demos and as examples of the
python executor. Defined in agents/definitions/.

Each reads its material from its input or, when the input does not give it, from the
outputs of the tasks it depends on (the first upstream output that has the key).
"""

from __future__ import annotations

import json
import re
from typing import Any

from orchestration.errors import PermanentError, RetryableError
from orchestration.runtime.context import TaskContext


def _tools(context: TaskContext):
    if context.tools is None:
        raise PermanentError(f"agent {context.agent_id!r} needs its tools; run it through the engine")
    return context.tools


def _material(task_input: dict[str, Any], context: TaskContext, key: str, kind: type | tuple[type, ...]) -> Any:
    """input[key], else the first upstream output (by task name) that has `key`."""
    if key in task_input:
        value = task_input[key]
    else:
        found = [out[key] for _, out in sorted(context.upstream.items()) if isinstance(out, dict) and key in out]
        if not found:
            raise PermanentError(f"input.{key} is required (or an upstream task whose output has {key!r})")
        value = found[0]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise PermanentError(f"{key} must be a {names}, got {type(value).__name__}")
    return value


def _upstream_with(context: TaskContext, key: str) -> dict[str, Any]:
    for _, out in sorted(context.upstream.items()):
        if isinstance(out, dict) and key in out:
            return out
    return {}


def ingest(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Gather the documents of a run (text, Python source, a JSON config and its schema) and
    normalise the text. With `fail_times: N` the source counts as unavailable for the first
    N attempts (a transient failure, retried by the engine)."""
    fail_times = task_input.get("fail_times", 0)
    if isinstance(fail_times, bool) or not isinstance(fail_times, int) or fail_times < 0:
        raise PermanentError(f"input.fail_times must be a non-negative integer, got {fail_times!r}")
    if context.attempt_number <= fail_times:
        raise RetryableError(f"ingest: document store unavailable (planned, attempt {context.attempt_number})")
    document = task_input.get("document")
    if not isinstance(document, str) or not document.strip():
        raise PermanentError("input.document must be a non-empty text")
    text = "\n\n".join(" ".join(paragraph.split()) for paragraph in re.split(r"\n\s*\n", document) if paragraph.strip())
    output: dict[str, Any] = {"text": text, "characters": len(text)}
    for key in ("source", "config", "schema"):
        if key in task_input:
            output[key] = task_input[key]
    return output


def text_analyst(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Statistics and key phrases of a text (tools text_stats and keywords)."""
    text = _material(task_input, context, "text", str)
    tools = _tools(context)
    stats = tools.call("text_stats", {"text": text})
    found = tools.call("keywords", {"text": text, "top_n": task_input.get("top_n", 8)})
    return {"stats": stats, "keywords": found["keywords"]}


def code_analyst(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Metrics of Python source (tool code_metrics), with the functions over a complexity
    threshold (`max_complexity`, default 10) listed as hotspots."""
    source = _material(task_input, context, "source", str)
    limit = task_input.get("max_complexity", 10)
    metrics = _tools(context).call("code_metrics", {"source": source})
    hotspots = [
        {"name": f["name"], "line": f["line"], "complexity": f["complexity"]}
        for f in metrics["functions"]
        if f["complexity"] > limit
    ]
    return {"metrics": metrics, "hotspots": hotspots, "max_complexity_allowed": limit}


def schema_validator(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Validate a JSON document (`config`) against a JSON Schema (`schema`) with the tool
    json_validate. With `fail_on_invalid` an invalid document fails the task."""
    document = _material(task_input, context, "config", (dict, list, str, int, float, bool))
    schema = _material(task_input, context, "schema", (dict, bool))
    verdict = _tools(context).call("json_validate", {"document": document, "schema": schema})
    if task_input.get("fail_on_invalid") and not verdict["valid"]:
        details = "; ".join(f"{e['path']}: {e['message']}" for e in verdict["errors"][:10])
        raise PermanentError(f"the document does not match the schema: {details}")
    return verdict


def calculator(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Evaluate named expressions in order (tool calculator); each may use the variables
    given, the numbers picked from upstream outputs (`from_upstream`: name -> "task.path.to"),
    and the results of the expressions before it."""
    expressions = task_input.get("expressions")
    if not isinstance(expressions, dict) or not expressions:
        raise PermanentError("input.expressions must be a mapping of name -> expression")
    variables = dict(task_input.get("variables") or {})
    for name, path in (task_input.get("from_upstream") or {}).items():
        variables[name] = _pick_number(context.upstream, path)
    tools = _tools(context)
    results: dict[str, Any] = {}
    for name, expression in expressions.items():
        value = tools.call("calculator", {"expression": str(expression), "variables": variables})["result"]
        results[name] = variables[name] = value
    return {"results": results}


def _pick_number(upstream: dict[str, Any], path: str) -> float:
    value: Any = upstream
    for part in str(path).split("."):
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            raise PermanentError(f"from_upstream: {path!r} does not exist in the upstream outputs")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PermanentError(f"from_upstream: {path!r} is {type(value).__name__}, not a number")
    return value


def summarizer(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Extractive summary (tool summarize). A reviewer's `feedback` (max_words, must_include)
    makes it revise: fewer sentences until the summary fits, the required terms boosted."""
    text = _material(task_input, context, "text", str)
    feedback = task_input.get("feedback") or {}
    max_sentences = int(task_input.get("max_sentences", 3))
    must_include = list(feedback.get("must_include") or [])
    max_words = feedback.get("max_words")
    tools = _tools(context)
    while True:
        result = tools.call("summarize", {"text": text, "max_sentences": max_sentences, "must_include": must_include})
        if max_words is None or result["words"] <= max_words or max_sentences == 1:
            break
        max_sentences -= 1
    return {
        "summary": result["summary"],
        "words": result["words"],
        "sentences": result["sentences"],
        "revision": int(task_input.get("revision", 0)),
    }


def _review(summary: str, words: int, keywords: list[str], *, max_words: int, min_keywords: int) -> dict[str, Any]:
    lower = summary.lower()
    covered = [k for k in keywords if k in lower]
    problems = []
    if words > max_words:
        problems.append(f"{words} words; at most {max_words}")
    if len(covered) < min(min_keywords, len(keywords)):
        problems.append(f"covers {len(covered)} of the key phrases {keywords}; needs {min_keywords}")
    length_score = min(1.0, max_words / words) if words else 0.0
    coverage_score = len(covered) / len(keywords) if keywords else 1.0
    return {
        "score": round(0.5 * length_score + 0.5 * coverage_score, 3),
        "approved": not problems,
        "problems": problems,
        "covered_keywords": covered,
    }


def reviewer(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Score an upstream summary against the text's key phrases and a length limit. When it
    falls short, send feedback to its author and hand the work back for revision (up to
    `max_revisions` times); the approved (or last) version is the output.

    Asked for a review by another agent (`input.output` with a summary, `input.criteria`
    with max_words, min_keywords and keywords), it returns its verdict on that output."""
    if isinstance(task_input.get("output"), dict):
        return _review_requested(task_input["output"], task_input.get("criteria") or {})
    summary_out = _upstream_with(context, "summary")
    if not summary_out:
        raise PermanentError("reviewer: no upstream output has a 'summary' to review")
    keywords = [k["phrase"] for k in _upstream_with(context, "keywords").get("keywords", [])][:5]
    text = _material(task_input, context, "text", str)
    author = str(task_input.get("author", "summarizer"))
    max_words = int(task_input.get("max_words", 60))
    min_keywords = int(task_input.get("min_keywords", 2))
    max_revisions = int(task_input.get("max_revisions", 2))
    current = summary_out
    rounds = []
    for revision in range(max_revisions + 1):
        verdict = _review(
            current["summary"], current["words"], keywords, max_words=max_words, min_keywords=min_keywords
        )
        rounds.append({"revision": revision, "words": current["words"], **verdict})
        if verdict["approved"] or revision == max_revisions or context.peers is None:
            break
        feedback = {"max_words": max_words, "must_include": keywords[:min_keywords]}
        context.peers.feedback(author, "; ".join(verdict["problems"]), payload={"score": verdict["score"], **feedback})
        current = context.peers.handoff(
            author,
            {"text": text, "feedback": feedback, "revision": revision + 1, "max_sentences": 3},
            message=f"revise: {'; '.join(verdict['problems'])}",
        )
    final = rounds[-1]
    return {
        "approved": final["approved"],
        "score": final["score"],
        "summary": current["summary"],
        "revisions": len(rounds) - 1,
        "rounds": rounds,
    }


def _review_requested(output: dict[str, Any], criteria: dict[str, Any]) -> dict[str, Any]:
    summary = output.get("summary")
    if not isinstance(summary, str):
        raise PermanentError("review: the output to review has no 'summary' text")
    keywords = [str(k).lower() for k in criteria.get("keywords", [])]
    return _review(
        summary,
        len(summary.split()),
        keywords,
        max_words=int(criteria.get("max_words", 60)),
        min_keywords=int(criteria.get("min_keywords", 1)),
    )


def reporter(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """Fan-in: one report from the upstream analyses, with derived figures computed by the
    calculator tool (comment ratio, average function complexity, reading time)."""
    text = _upstream_with(context, "stats")
    code = _upstream_with(context, "metrics").get("metrics", {})
    config = _upstream_with(context, "valid")
    review = _upstream_with(context, "approved")
    variables = {
        "words": text.get("stats", {}).get("words", 0),
        "code_lines": code.get("code_lines", 0),
        "comment_lines": code.get("comment_lines", 0),
        "functions": len(code.get("functions", [])),
        "total_complexity": sum(f["complexity"] for f in code.get("functions", [])),
    }
    tools = _tools(context)
    figures = {
        "comment_ratio": "round(comment_lines / max(code_lines, 1), 3)",
        "average_complexity": "round(total_complexity / max(functions, 1), 2)",
        "reading_seconds": "round(words / 238 * 60)",
    }
    computed = {
        name: tools.call("calculator", {"expression": expression, "variables": variables})["result"]
        for name, expression in figures.items()
    }
    return {
        "title": str(task_input.get("title", "run report")),
        "figures": {**variables, **computed},
        "keywords": [k["phrase"] for k in text.get("keywords", [])][:5],
        "hotspots": _upstream_with(context, "hotspots").get("hotspots", []),
        "config_valid": config.get("valid"),
        "config_errors": len(config.get("errors", [])),
        "summary": review.get("summary"),
        "summary_approved": review.get("approved"),
        "summary_revisions": review.get("revisions"),
    }


# ---------------------------------------------------------------------------- conversation


def _last_result(history: list[dict[str, Any]]) -> float | int | None:
    for message in reversed(history):
        if message["role"] == "tool":
            try:
                reply = json.loads(message["content"])
            except ValueError:
                continue
            if isinstance(reply, dict) and isinstance(reply.get("result"), int | float):
                return reply["result"]
    return None


def assistant(task_input: dict[str, Any], context: TaskContext) -> dict[str, Any]:
    """A conversational agent that works offline. It answers arithmetic (with `ans`, the
    previous result in the thread), `stats: <text>`, `keywords: <text>`, and `history`."""
    messages = task_input.get("messages") or [{"role": "user", "content": task_input.get("message", "")}]
    question = str(messages[-1].get("content") or "").strip()
    earlier_user = [m["content"] for m in messages[:-1] if m["role"] == "user"]
    tools = _tools(context)
    lower = question.lower()
    if lower.startswith("stats:"):
        stats = tools.call("text_stats", {"text": question[6:].strip()})
        content = (
            f"{stats['words']} words in {stats['sentences']} sentences; "
            f"reading ease {stats.get('flesch_reading_ease', 'n/a')}."
        )
    elif lower.startswith("keywords:"):
        found = tools.call("keywords", {"text": question[9:].strip(), "top_n": 5})["keywords"]
        content = "Key phrases: " + (", ".join(k["phrase"] for k in found) or "none found") + "."
    elif lower in ("history", "what did i say?", "what did i say"):
        if earlier_user:
            content = f"This is turn {len(earlier_user) + 1}. Before this you said: " + " | ".join(earlier_user)
        else:
            content = "This is the first message of our conversation."
    else:
        variables = {}
        previous = _last_result(messages[:-1])
        if previous is not None:
            variables["ans"] = previous
        try:
            result = tools.call("calculator", {"expression": question, "variables": variables})["result"]
        except PermanentError as exc:
            content = (
                f"I could not work that out ({exc}). I can do arithmetic (use 'ans' for the last result), "
                "'stats: <text>', 'keywords: <text>' and 'history'."
            )
        else:
            content = f"= {result}"
    return {"content": content, "turn": len(earlier_user) + 1}
