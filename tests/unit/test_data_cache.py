"""data.cache_dir: the cached (datasets, memory-mapped) examples equal the uncached ones; a second load reads the
cache without tokenizing; a changed source gets a new key; CSV and parquet read through datasets; and the
data benchmark runs end to end on 2 CPU ranks with a few rows."""

import json

import pytest

from aletheia_ds import data_cache
from aletheia_ds.data import load_examples, load_tokenizer
from aletheia_ds.data_cache import TokenizedRows, cache_key, cached_examples

TOK = "examples/tiny/tokenizer"


@pytest.fixture(scope="module")
def tok(root):
    return load_tokenizer(str(root / TOK))


def _cached(path, tok, cache, seq_len=48):
    return cached_examples(
        path, tok, seq_len, cache, num_proc=1, tokenizes=True, barrier=lambda: None, log=lambda line: None
    )


def test_cached_examples_equal_uncached_and_second_load_skips_tokenizing(tok, root, tmp_path, monkeypatch):
    source = root / "examples/tiny/train.jsonl"
    want = load_examples(source, tok, 48, log=lambda line: None)
    got = _cached(source, tok, tmp_path / "cache")
    assert isinstance(got, TokenizedRows) and len(got) == len(want)
    assert [(e.input_ids, e.labels) for e in got] == [(e.input_ids, e.labels) for e in want]
    assert got[3].input_ids == want[3].input_ids and len(got[:5]) == 5

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(data_cache, "read_dataset", refuse)
    again = _cached(source, tok, tmp_path / "cache")
    assert [e.input_ids for e in again] == [e.input_ids for e in want]
    assert (again + again)[len(again)].input_ids == want[0].input_ids


def test_key_follows_source_seq_len_and_packing(tok, tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"text": "alpha beta"}) + "\n")
    key = cache_key(path, tok, 48, False)
    assert key != cache_key(path, tok, 64, False) != cache_key(path, tok, 48, True)
    path.write_text(json.dumps({"text": "alpha beta gamma"}) + "\n")
    assert cache_key(path, tok, 48, False) != key


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_and_parquet_read_through_datasets(tok, tmp_path, suffix):
    import datasets

    rows = [{"prompt": f"question {i}", "completion": f"answer {i}"} for i in range(5)]
    path = tmp_path / f"rows{suffix}"
    ds = datasets.Dataset.from_list(rows)
    ds.to_csv(str(path), index=False) if suffix == ".csv" else ds.to_parquet(str(path))
    got = _cached(path, tok, tmp_path / "cache")
    jsonl = tmp_path / "rows.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [e.labels for e in got] == [e.labels for e in load_examples(jsonl, tok, 48, log=lambda line: None)]
