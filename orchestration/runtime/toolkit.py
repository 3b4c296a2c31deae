"""Built-in tools: real work, offline (no network, no model weights).

calculator      arithmetic on a safe subset of Python expressions
text_stats      counts, sentence and word lengths, Flesch reading ease and grade level
keywords        key phrases (RAKE: stop-word-delimited phrases scored by word degree)
summarize       extractive summary (sentences scored by the frequency of their words)
code_metrics    Python source metrics from `ast` and `tokenize` (complexity, nesting, docstrings)
json_validate   a JSON document against a JSON Schema (draft 2020-12)
"""

from __future__ import annotations

import ast
import io
import math
import operator
import re
import tokenize
from collections import Counter
from collections.abc import Iterator
from typing import Any

import regex
from jsonschema import Draft202012Validator, validators
from jsonschema.exceptions import SchemaError, ValidationError
from referencing import Registry
from referencing.exceptions import Unresolvable

from orchestration.errors import ToolError
from orchestration.runtime.tools import tool

MAX_TEXT_CHARS = 200_000
MAX_SOURCE_CHARS = 200_000

# ---------------------------------------------------------------------------- calculator

_BINARY = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCTIONS = {
    "abs": abs,
    "round": round,
    "min": min,
    "max": max,
    "sqrt": math.sqrt,
    "log": math.log,
    "log10": math.log10,
    "exp": math.exp,
    "sin": math.sin,
    "cos": math.cos,
    "tan": math.tan,
    "floor": math.floor,
    "ceil": math.ceil,
}
_CONSTANTS = {"pi": math.pi, "e": math.e}
MAX_EXPONENT = 1000
MAX_MAGNITUDE = 1e300
MAX_ROUND_DIGITS = 300


def _number(value: float | int, what: str) -> float | int:
    """Every operand and result stays a finite number of bounded size, so no step of an
    expression can take long or use much memory (big integers are exact, hence the bound)."""
    if isinstance(value, complex):
        raise ToolError(f"calculator: {what} is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise ToolError(f"calculator: {what} is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        raise ToolError(f"calculator: {what} is too large (beyond 1e300)")
    return value


def _power(left: float | int, right: float | int) -> float | int:
    if abs(right) > MAX_EXPONENT:
        raise ToolError(f"calculator: exponent {right} is larger than {MAX_EXPONENT}")
    # |left| ** right stays under the bound only if right * log10|left| does: check first.
    if abs(left) > 1 and right > 0 and right * math.log10(abs(left)) > 300:
        raise ToolError("calculator: the result is too large (beyond 1e300)")
    return left**right


def _call(name: str, args: list[float | int]) -> float | int:
    if name == "round" and len(args) == 2:
        digits = args[1]
        if not isinstance(digits, int) or abs(digits) > MAX_ROUND_DIGITS:
            raise ToolError(f"calculator: round(): ndigits must be an integer within ±{MAX_ROUND_DIGITS}")
    try:
        return _FUNCTIONS[name](*args)
    except (ValueError, TypeError, OverflowError) as exc:
        raise ToolError(f"calculator: {name}(): {exc}") from None


def _evaluate(node: ast.AST, names: dict[str, float]) -> float | int:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, names)
    if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
        return _number(node.value, "a number")
    if isinstance(node, ast.Name):
        if node.id in names:
            return _number(names[node.id], f"variable {node.id!r}")
        raise ToolError(f"calculator: unknown name {node.id!r}")
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, names))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left, names), _evaluate(node.right, names)
        try:
            operation = _power if isinstance(node.op, ast.Pow) else _BINARY[type(node.op)]
            value = operation(left, right)
        except ZeroDivisionError:
            raise ToolError("calculator: division by zero") from None
        except OverflowError:
            raise ToolError("calculator: the result is too large (beyond 1e300)") from None
        return _number(value, "the result")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
        if node.func.id not in _FUNCTIONS:
            raise ToolError(f"calculator: unknown function {node.func.id!r} (known: {', '.join(sorted(_FUNCTIONS))})")
        args = [_evaluate(arg, names) for arg in node.args]
        return _number(_call(node.func.id, args), f"{node.func.id}()")
    raise ToolError(f"calculator: {type(node).__name__} is not allowed in an expression")


def evaluate(expression: str, variables: dict[str, float] | None = None) -> float | int:
    """Evaluate an arithmetic expression (numbers, + - * / // % **, parentheses, the
    functions and constants above, and the given variables)."""
    try:
        tree = ast.parse(expression.strip(), mode="eval")
        value = _evaluate(tree, {**_CONSTANTS, **(variables or {})})
    except SyntaxError as exc:
        raise ToolError(f"calculator: cannot parse {expression!r}: {exc.msg}") from None
    except RecursionError:
        raise ToolError("calculator: the expression is nested too deeply") from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    return value


@tool(
    name="calculator",
    description="Evaluate an arithmetic expression: numbers, + - * / // % **, parentheses, "
    "abs round min max sqrt log log10 exp sin cos tan floor ceil, pi and e, and optional variables.",
    parameters={
        "type": "object",
        "properties": {
            "expression": {"type": "string", "minLength": 1, "maxLength": 1000},
            "variables": {"type": "object", "additionalProperties": {"type": "number"}},
        },
        "required": ["expression"],
        "additionalProperties": False,
    },
)
def calculator(expression: str, variables: dict[str, float] | None = None) -> dict[str, Any]:
    return {"expression": expression, "result": evaluate(expression, variables)}


# ---------------------------------------------------------------------------- text

_STOP_WORDS_TEXT = """a about above after again against all also am an and any are as at be because been before being
    below between both but by can could did do does doing down during each even every few for from
    further had has have having he her here hers herself him himself his how i if in into is it its
    itself just let me more most much must my myself no nor not now of off on once only or other our
    ours ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up upon us very was we
    were what when where which while who whom why will with within without would you your yours
    yourself yourselves"""
STOP_WORDS = frozenset(_STOP_WORDS_TEXT.split())
_WORD = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[]?[A-Z0-9])")
_PHRASE_BREAK = re.compile(r"[.,;:!?()\[\]{}\"\u2013\u2014]|\s-\s|\n")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")


def _check_text(text: str) -> str:
    if len(text) > MAX_TEXT_CHARS:
        raise ToolError(f"text is {len(text)} characters; the limit is {MAX_TEXT_CHARS}")
    return text


def sentences_of(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def words_of(text: str) -> list[str]:
    return _WORD.findall(text)


def syllables(word: str) -> int:
    """A vowel-group estimate (English), good enough for readability scores."""
    word = word.lower().strip("'-")
    if not word or word[0].isdigit():
        return 1
    count = len(_VOWEL_GROUPS.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee", "ye")) and count > 1:
        count -= 1
    return max(count, 1)


@tool(
    name="text_stats",
    description="Statistics of a text: characters, words, sentences, paragraphs, average lengths, "
    "lexical diversity, Flesch reading ease, Flesch-Kincaid grade and reading time.",
    parameters={
        "type": "object",
        "properties": {"text": {"type": "string", "maxLength": MAX_TEXT_CHARS}},
        "required": ["text"],
        "additionalProperties": False,
    },
)
def text_stats(text: str) -> dict[str, Any]:
    text = _check_text(text)
    words = words_of(text)
    sentences = sentences_of(text)
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if p.strip()]
    n_words, n_sentences = len(words), max(len(sentences), 1 if words else 0)
    n_syllables = sum(syllables(w) for w in words)
    stats: dict[str, Any] = {
        "characters": len(text),
        "words": n_words,
        "sentences": len(sentences),
        "paragraphs": len(paragraphs),
        "unique_words": len({w.lower() for w in words}),
        "reading_time_minutes": round(n_words / 238, 2),
    }
    if n_words:
        words_per_sentence = n_words / n_sentences
        syllables_per_word = n_syllables / n_words
        stats.update(
            average_word_length=round(sum(len(w) for w in words) / n_words, 2),
            average_sentence_words=round(words_per_sentence, 2),
            lexical_diversity=round(stats["unique_words"] / n_words, 3),
            flesch_reading_ease=round(206.835 - 1.015 * words_per_sentence - 84.6 * syllables_per_word, 1),
            flesch_kincaid_grade=round(0.39 * words_per_sentence + 11.8 * syllables_per_word - 15.59, 1),
        )
    return stats


def _candidate_phrases(text: str) -> list[list[str]]:
    phrases: list[list[str]] = []
    for chunk in _PHRASE_BREAK.split(text):
        current: list[str] = []
        for word in words_of(chunk):
            lower = word.lower()
            if lower in STOP_WORDS or lower[0].isdigit() or len(lower) < 2:
                if current:
                    phrases.append(current)
                current = []
            else:
                current.append(lower)
        if current:
            phrases.append(current)
    return [p for p in phrases if len(p) <= 4]


def rake(text: str, *, top_n: int) -> list[dict[str, Any]]:
    """Rapid Automatic Keyword Extraction (Rose et al., 2010): score(word) = degree/frequency,
    score(phrase) = sum of its words' scores. Ties break alphabetically, so output is stable."""
    phrases = _candidate_phrases(text)
    frequency: Counter[str] = Counter()
    degree: Counter[str] = Counter()
    for phrase in phrases:
        for word in phrase:
            frequency[word] += 1
            degree[word] += len(phrase)
    word_score = {w: degree[w] / frequency[w] for w in frequency}
    scored: dict[str, float] = {}
    counts: Counter[str] = Counter()
    for phrase in phrases:
        key = " ".join(phrase)
        scored[key] = sum(word_score[w] for w in phrase)
        counts[key] += 1
    ranked = sorted(scored.items(), key=lambda item: (-item[1], item[0]))[:top_n]
    return [{"phrase": phrase, "score": round(score, 3), "count": counts[phrase]} for phrase, score in ranked]


@tool(
    name="keywords",
    description="Key phrases of a text (RAKE), best first, with their scores and counts.",
    parameters={
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": MAX_TEXT_CHARS},
            "top_n": {"type": "integer", "minimum": 1, "maximum": 100, "default": 10},
        },
        "required": ["text"],
        "additionalProperties": False,
    },
)
def keywords(text: str, top_n: int = 10) -> dict[str, Any]:
    return {"keywords": rake(_check_text(text), top_n=top_n)}


@tool(
    name="summarize",
    description="Extractive summary: the sentences whose words are most frequent in the text, "
    "in their original order, at most max_sentences of them.",
    parameters={
        "type": "object",
        "properties": {
            "text": {"type": "string", "maxLength": MAX_TEXT_CHARS},
            "max_sentences": {"type": "integer", "minimum": 1, "maximum": 50, "default": 3},
            "must_include": {"type": "array", "items": {"type": "string"}, "maxItems": 20},
        },
        "required": ["text"],
        "additionalProperties": False,
    },
)
def summarize(text: str, max_sentences: int = 3, must_include: list[str] | None = None) -> dict[str, Any]:
    sentences = sentences_of(_check_text(text))
    content = Counter(w.lower() for w in words_of(text) if w.lower() not in STOP_WORDS)
    top = max(content.values(), default=1)
    boost = {term.lower() for term in must_include or []}

    def score(sentence: str) -> float:
        words = [w.lower() for w in words_of(sentence) if w.lower() not in STOP_WORDS]
        if not words:
            return 0.0
        base = sum(content[w] / top for w in words) / len(words)
        return base + sum(1.0 for term in boost if term in sentence.lower())

    ranked = sorted(range(len(sentences)), key=lambda i: (-score(sentences[i]), i))[:max_sentences]
    chosen = [sentences[i] for i in sorted(ranked)]
    summary = " ".join(chosen)
    return {"summary": summary, "sentences": len(chosen), "words": len(words_of(summary))}


# ---------------------------------------------------------------------------- code

_BRANCHES = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.ExceptHandler, ast.IfExp, ast.Assert, ast.match_case)
_NESTING = (ast.If, ast.For, ast.AsyncFor, ast.While, ast.With, ast.AsyncWith, ast.Try, ast.Match)
_FUNCTIONS_NODES = (ast.FunctionDef, ast.AsyncFunctionDef)


def cyclomatic_complexity(node: ast.AST) -> int:
    """McCabe complexity: 1 + decision points (branches, boolean operators, comprehension
    conditions), not counting nested functions, which are measured on their own."""
    complexity = 1
    stack = list(ast.iter_child_nodes(node))
    while stack:
        child = stack.pop()
        if isinstance(child, (*_FUNCTIONS_NODES, ast.ClassDef, ast.Lambda)):
            continue
        if isinstance(child, _BRANCHES):
            complexity += 1
        elif isinstance(child, ast.BoolOp):
            complexity += len(child.values) - 1
        elif isinstance(child, ast.comprehension):
            complexity += 1 + len(child.ifs)
        stack.extend(ast.iter_child_nodes(child))
    return complexity


def nesting_depth(node: ast.AST, depth: int = 0) -> int:
    """How deep blocks nest inside `node` (an `elif` counts as the level of its `if`)."""
    deepest = depth
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (*_FUNCTIONS_NODES, ast.ClassDef)):
            continue
        is_elif = isinstance(node, ast.If) and node.orelse == [child] and isinstance(child, ast.If)
        deeper = isinstance(child, _NESTING) and not is_elif
        deepest = max(deepest, nesting_depth(child, depth + 1 if deeper else depth))
    return deepest


def _line_kinds(source: str) -> dict[str, int]:
    lines = source.splitlines()
    comment_lines: set[int] = set()
    code_lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comment_lines.add(token.start[0])
        elif token.type not in skip:
            code_lines.update(range(token.start[0], token.end[0] + 1))
    blank = sum(1 for line in lines if not line.strip())
    return {
        "lines": len(lines),
        "code_lines": len(code_lines),
        "comment_lines": len(comment_lines - code_lines),
        "blank_lines": blank,
    }


@tool(
    name="code_metrics",
    description="Metrics of Python source: lines (code, comment, blank), functions and classes "
    "with cyclomatic complexity, length, arguments and nesting depth, imports, docstring coverage.",
    parameters={
        "type": "object",
        "properties": {"source": {"type": "string", "maxLength": MAX_SOURCE_CHARS}},
        "required": ["source"],
        "additionalProperties": False,
    },
)
def code_metrics(source: str) -> dict[str, Any]:
    try:
        return _code_metrics(source)
    except RecursionError:
        raise ToolError("code_metrics: the source is nested too deeply to analyse") from None


def _code_metrics(source: str) -> dict[str, Any]:
    try:
        tree = ast.parse(source)
        kinds = _line_kinds(source)
    except SyntaxError as exc:
        raise ToolError(f"code_metrics: not valid Python: line {exc.lineno}: {exc.msg}") from None
    except tokenize.TokenError as exc:
        raise ToolError(f"code_metrics: not valid Python: {exc.args[0]}") from None
    functions = []
    classes = []
    imports: set[str] = set()
    documented = documentable = 0
    for node in ast.walk(tree):
        if isinstance(node, _FUNCTIONS_NODES):
            args = node.args
            functions.append(
                {
                    "name": node.name,
                    "line": node.lineno,
                    "length": (node.end_lineno or node.lineno) - node.lineno + 1,
                    "arguments": len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs),
                    "complexity": cyclomatic_complexity(node),
                    "nesting": nesting_depth(node),
                    "docstring": ast.get_docstring(node) is not None,
                }
            )
        elif isinstance(node, ast.ClassDef):
            methods = [n.name for n in node.body if isinstance(n, _FUNCTIONS_NODES)]
            classes.append({"name": node.name, "line": node.lineno, "methods": len(methods)})
        elif isinstance(node, ast.Import):
            imports.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imports.add(node.module.split(".")[0])
        if isinstance(node, (*_FUNCTIONS_NODES, ast.ClassDef)):
            documentable += 1
            documented += ast.get_docstring(node) is not None
    functions.sort(key=lambda f: f["line"])
    complexities = [f["complexity"] for f in functions]
    return {
        **kinds,
        "functions": functions,
        "classes": classes,
        "imports": sorted(imports),
        "max_complexity": max(complexities, default=0),
        "average_complexity": round(sum(complexities) / len(complexities), 2) if complexities else 0,
        "docstring_coverage": round(documented / documentable, 3) if documentable else 1.0,
    }


# ---------------------------------------------------------------------------- JSON schema

# Patterns in a schema come from task input or a model: a pattern that backtracks
# exponentially ("^(a+)+$") must not hold a worker, and Python's `re` cannot be interrupted.
# The keywords that match patterns use the `regex` module, whose matching takes a timeout.
REGEX_TIMEOUT_SECONDS = 0.5


def _search(pattern: str, text: str) -> bool:
    try:
        return regex.search(pattern, text, timeout=REGEX_TIMEOUT_SECONDS) is not None
    except TimeoutError:
        raise ToolError(
            f"json_validate: the pattern {pattern!r} took over {REGEX_TIMEOUT_SECONDS} s to match; simplify it"
        ) from None
    except regex.error as exc:
        raise ToolError(f"json_validate: the pattern {pattern!r} is not a valid regular expression: {exc}") from None


def _pattern(validator: Any, pattern: str, instance: Any, schema: dict[str, Any]) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _search(pattern, instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _pattern_properties(
    validator: Any, patterns: dict[str, Any], instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    for pattern, subschema in patterns.items():
        for key, value in instance.items():
            if _search(pattern, key):
                yield from validator.descend(value, subschema, path=key, schema_path=pattern)


def _additional_properties(
    validator: Any, additional: Any, instance: Any, schema: dict[str, Any]
) -> Iterator[ValidationError]:
    if not validator.is_type(instance, "object"):
        return
    properties = schema.get("properties", {})
    patterns = schema.get("patternProperties", {})
    extras = [key for key in instance if key not in properties and not any(_search(p, key) for p in patterns)]
    if validator.is_type(additional, "object"):
        for key in extras:
            yield from validator.descend(instance[key], additional, path=key)
    elif additional is False and extras:
        listed = ", ".join(repr(key) for key in sorted(extras))
        yield ValidationError(f"Additional properties are not allowed ({listed} unexpected)")


SchemaValidator = validators.extend(
    Draft202012Validator,
    {"pattern": _pattern, "patternProperties": _pattern_properties, "additionalProperties": _additional_properties},
)


@tool(
    name="json_validate",
    description="Validate a JSON document against a JSON Schema (draft 2020-12); every error with its path.",
    parameters={
        "type": "object",
        "properties": {"document": {}, "schema": {"type": ["object", "boolean"]}},
        "required": ["document", "schema"],
        "additionalProperties": False,
    },
)
def json_validate(document: Any, schema: dict[str, Any] | bool) -> dict[str, Any]:
    try:
        SchemaValidator.check_schema(schema)
    except SchemaError as exc:
        where = "/".join(map(str, exc.absolute_path)) or "(root)"
        raise ToolError(f"json_validate: the schema is invalid at {where}: {exc.message}") from None
    try:
        # An empty registry: a $ref resolves within the schema (and the drafts' meta-schemas)
        # only. jsonschema's default fetches any other URL a $ref names with urllib, which a
        # model's schema would have the worker do past the URL policy (a metadata service, a
        # loopback port, a file:// path), through the proxy variables and with no timeout.
        found = list(SchemaValidator(schema, registry=Registry()).iter_errors(document))
    except RecursionError:
        raise ToolError("json_validate: the document or schema is nested too deeply") from None
    except Unresolvable as exc:
        raise ToolError(
            f"json_validate: the schema's $ref {exc.ref!r} is not in the schema (no URL is fetched)"
        ) from None
    errors = [
        {"path": "/" + "/".join(map(str, e.absolute_path)), "message": e.message, "keyword": e.validator} for e in found
    ]
    errors.sort(key=lambda e: (e["path"], e["keyword"], e["message"]))
    return {"valid": not errors, "errors": errors}
