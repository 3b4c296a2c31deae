"""What `datasets` reads back from an export directory is that directory's file, not rows it
cached from another export of the same window (another root, or a `--force` re-export)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from tests.factories import AgentFactory
from tests.training_export.test_chat import DAY, T0, thread
from training_export.services.export import export_run


def test_the_same_window_under_two_roots_loads_each_ones_rows(db, out, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = str(tmp_path / "hf-cache")  # one cache, as a trainer's machine has
    agent = AgentFactory(system_prompt="Be brief.")
    thread("t-1", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    first = export_run(data_type="conversations", start_date=DAY, end_date=DAY, output_dir=tmp_path / "a")
    assert datasets.load_dataset(str(Path(first.path).parent), cache_dir=cache)["train"].num_rows == 1

    later = T0 + dt.timedelta(hours=1)
    thread("t-2", agent, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}], at=later)
    second = export_run(data_type="conversations", start_date=DAY, end_date=DAY, output_dir=tmp_path / "b")
    assert second.rows == 2
    loaded = datasets.load_dataset(str(Path(second.path).parent), cache_dir=cache)
    assert loaded["train"].num_rows == 2  # was 1: the first root's rows, from the cache


def test_a_forced_re_export_loads_its_new_rows(db, out, tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    cache = str(tmp_path / "hf-cache")
    agent = AgentFactory(system_prompt="Be brief.")
    thread("t-1", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    first = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    assert datasets.load_dataset(str(Path(first.path).parent), cache_dir=cache)["train"].num_rows == 1

    thread("t-2", agent, [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    again = export_run(data_type="conversations", start_date=DAY, end_date=DAY, force=True)
    assert again.path == first.path and again.rows == 2
    assert datasets.load_dataset(str(Path(again.path).parent), cache_dir=cache)["train"].num_rows == 2


def test_the_card_states_the_rows_and_bytes_of_its_file(db, out):
    agent = AgentFactory()
    thread("t-1", agent, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"}])
    run = export_run(data_type="conversations", start_date=DAY, end_date=DAY)
    size = Path(run.path).stat().st_size
    front_matter = (Path(run.path).parent / "README.md").read_text().split("---\n")[1]
    assert f"  - name: train\n    num_bytes: {size}\n    num_examples: 1\n" in front_matter
