"""The manifest and the dataset card written beside every export.

Both are deterministic (no run timestamps: those live in the export_runs row), so a re-run
of a window reproduces them byte for byte along with the data file.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
CARD_NAME = "README.md"
SPLIT = "train"

_DESCRIPTIONS = {
    "events": "AgentLedger events (the append-only audit log), one JSON object per event, in sequence order.",
    "tasks": "AgentLedger finished task executions, one JSON object per task, by completion time.",
    "tool_executions": (
        "AgentLedger tool calls (tool_executed events), one JSON object per call; `execution_id`, "
        "`attempt_number` and `tool_call_id` join a call to the assistant message that made it."
    ),
    "workflows": "AgentLedger finished workflows, one JSON object per workflow, by completion time.",
    "conversations": (
        "AgentLedger agent conversations in OpenAI's chat fine-tuning format: one conversation per line, "
        '`{"messages": [...], "tools": [...]}`; assistant turns of failed or retried attempts carry `weight: 0`, '
        "as do turns generated under another system prompt or tools than the ones the example carries. "
        "Assistant messages with neither content nor tool calls are left out (counted in the manifest). "
        "`conversations-keys.jsonl` holds each example's join keys (thread, messages, tasks, attempts, "
        "tool calls), a line per example in the same order."
    ),
}


def data_file_name(data_type: str) -> str:
    """The data file of an export: the split in the name, so `datasets` maps it to `train`."""
    return f"{data_type}-{SPLIT}.jsonl"


@dataclass(frozen=True)
class KeysFile:
    """The keys file beside a conversations export: one line per example, in the same order."""

    path: str
    bytes: int
    sha256: str


@dataclass
class Manifest:
    data_type: str
    format: str
    schema_version: str
    window_start: dt.datetime
    window_end: dt.datetime
    file: str
    rows: int
    bytes: int
    sha256: str
    watermark: str
    skipped: Mapping[str, int] = field(default_factory=dict)
    legacy_prompt: int | None = None
    """Conversations only: examples written with the agent's current prompt and tools, their
    threads having no recorded prompt version (older than the recording of versions)."""
    left_out: Mapping[str, int] = field(default_factory=dict)
    """Conversations only: messages left out of the examples written, by reason (an empty
    assistant message); absent when none was."""
    keys_file: KeysFile | None = None
    """Conversations only: the join keys of each example (services/chat.py, `example_keys`)."""
    columns: tuple[str, ...] | None = None
    """The keys of every record (JSONL of the operational types; the chat format has its own)."""

    def as_dict(self) -> dict[str, Any]:
        optional: dict[str, Any] = {} if self.legacy_prompt is None else {"legacy_prompt": self.legacy_prompt}
        if self.left_out:
            optional["left_out"] = dict(sorted(self.left_out.items()))
        return {
            "data_type": self.data_type,
            "format": self.format,
            "schema_version": self.schema_version,
            "window": {
                "start": self.window_start.astimezone(dt.UTC).isoformat(),
                "end": self.window_end.astimezone(dt.UTC).isoformat(),
            },
            "watermark": self.watermark,
            "rows": {self.data_type: self.rows},
            "files": [
                {"path": self.file, "split": SPLIT, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256},
                *(
                    []
                    if self.keys_file is None
                    else [
                        {
                            "path": self.keys_file.path,
                            "keys_of": self.file,
                            "rows": self.rows,
                            "bytes": self.keys_file.bytes,
                            "sha256": self.keys_file.sha256,
                        }
                    ]
                ),
            ],
            **({} if self.columns is None else {"columns": list(self.columns)}),
            "skipped": dict(sorted(self.skipped.items())),
            **optional,
        }

    def encode(self) -> bytes:
        return (json.dumps(self.as_dict(), sort_keys=True, indent=2) + "\n").encode("utf-8")


def manifest_read(directory: Path) -> dict[str, Any]:
    return json.loads((Path(directory) / MANIFEST_NAME).read_text("utf-8"))


def dataset_card(manifest: Manifest) -> bytes:
    """A Hugging Face dataset card: YAML front matter naming the data file per split, so
    `datasets.load_dataset("json", ...)` or `load_dataset(<directory>)` reads it, and its rows
    and bytes (`dataset_info`). `datasets` caches what it read from a directory under the
    directory's name and the card's `configs` and `dataset_info`, not under the file's contents
    or its path: without the sizes, the same window exported under another root, or exported
    again (`--force`), would load the rows first read from the cache (with them, only a file
    of the same rows and bytes would). `datasets` also checks the rows against `num_examples`."""
    start = manifest.window_start.astimezone(dt.UTC).isoformat()
    end = manifest.window_end.astimezone(dt.UTC).isoformat()
    text = f"""---
configs:
- config_name: default
  data_files:
  - split: {SPLIT}
    path: {manifest.file}
dataset_info:
  splits:
  - name: {SPLIT}
    num_bytes: {manifest.bytes}
    num_examples: {manifest.rows}
  download_size: {manifest.bytes}
  dataset_size: {manifest.bytes}
---

# AgentLedger {manifest.data_type} export

{_DESCRIPTIONS.get(manifest.data_type, "")}

- window: `{start}` to `{end}` (end excluded, UTC)
- rows: {manifest.rows}
- schema version: {manifest.schema_version}
- sha256 of `{manifest.file}`: `{manifest.sha256}`

Secrets and configured personal data were masked as `[REDACTED]` before export.
See `{MANIFEST_NAME}` for the watermark and the counts.
"""
    return text.encode("utf-8")
