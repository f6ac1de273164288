"""Several training sources mixed by weight (fixed by the seed, the same through the cache), data.chat_template
(used, part of the cache key, a broken file named with its line), and the cached and uncached paths agreeing on
max_examples and on naming a bad JSONL line."""

import json

import pytest

from aletheia_ds.config import ConfigError, RunConfig
from aletheia_ds.data import DataError, load_examples, load_tokenizer, mixture
from aletheia_ds.data_cache import cache_key, cached_examples

TOK = "examples/tiny/tokenizer"
QUIET = {"log": lambda line: None}


@pytest.fixture(scope="module")
def tok(root):
    return load_tokenizer(str(root / TOK))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cached(path, tok, cache, seq_len=48, max_examples=None):
    return cached_examples(
        path, tok, seq_len, cache, num_proc=1, tokenizes=True, barrier=lambda: None, max_examples=max_examples, **QUIET
    )


def _sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"alpha {i}"} for i in range(300)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"beta {i} beta"} for i in range(300)])
    return a, b


def test_mixture_follows_weights_and_seed_and_the_cache_gives_the_same_rows(tok, tmp_path):
    a, b = _sources(tmp_path)
    parts = [load_examples(a, tok, 32), load_examples(b, tok, 32)]
    mixed = mixture(parts, [0.75, 0.25], 7, "first_exhausted", ["a", "b"], **QUIET)
    rows_of_a = {tuple(ex.input_ids) for ex in parts[0]}
    from_a = sum(tuple(ex.input_ids) in rows_of_a for ex in mixed)
    assert len(mixed) < 600 and 0.68 < from_a / len(mixed) < 0.82
    assert len({tuple(ex.input_ids) for ex in mixed}) == len(mixed)  # first_exhausted: no row twice
    again = mixture(parts, [0.75, 0.25], 7, "first_exhausted", ["a", "b"], **QUIET)
    other = mixture(parts, [0.75, 0.25], 8, "first_exhausted", ["a", "b"], **QUIET)
    assert [e.input_ids for e in again] == [e.input_ids for e in mixed] != [e.input_ids for e in other]
    cached = mixture(
        [_cached(a, tok, tmp_path / "c", 32), _cached(b, tok, tmp_path / "c", 32)],
        [0.75, 0.25],
        7,
        "first_exhausted",
        ["a", "b"],
        **QUIET,
    )
    assert [(e.input_ids, e.labels) for e in cached] == [(e.input_ids, e.labels) for e in mixed]
    everything = mixture(parts, [0.75, 0.25], 7, "all_exhausted", ["a", "b"], **QUIET)
    assert {tuple(e.input_ids) for e in everything} == {tuple(e.input_ids) for p in parts for e in p}
    assert mixture(parts[:1], [1.0], 7, "first_exhausted", ["a"], **QUIET) is parts[0]  # one source: as it was


def test_data_train_as_a_list_and_its_errors_name_the_entry(tmp_path):
    cfg = RunConfig(data={"train": [{"path": "a.jsonl", "weight": 0.7}, {"path": "b.parquet", "weight": 0.3}]})
    assert [(s.path, s.weight) for s in cfg.data.train_sources()] == [("a.jsonl", 0.7), ("b.parquet", 0.3)]
    assert [s.path for s in RunConfig(data={"train": "a.jsonl"}).data.train_sources()] == ["a.jsonl"]
    for train, message in [
        ([{"path": "a", "weight": 0}], r"data.train\[0\].weight: must be a finite number > 0"),
        ([{"path": "a"}, {"path": "b", "wieght": 1}], r"data.train\[1\]: unknown key 'wieght'"),
        ([{"weight": 1}], r"data.train\[0\].path"),
        (["a"], r"data.train\[0\]: must be"),
    ]:
        with pytest.raises(ConfigError, match=message):
            RunConfig(data={"train": train})


def test_chat_template_file_is_used_and_keys_the_cache(root, tmp_path):
    template = tmp_path / "chat.jinja"
    template.write_text(
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if m['role'] == 'assistant' %}"
        "{{ eos_token }}{% endif %}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    plain, custom = load_tokenizer(str(root / TOK)), load_tokenizer(str(root / TOK), chat_template=str(template))
    rows = write_jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}],
    )
    (ex,) = load_examples(rows, custom, 64)
    assert custom.decode(ex.input_ids).startswith("<user>2 + 2?<assistant>4")
    assert cache_key(rows, plain, 64, False) != cache_key(rows, custom, 64, False)
    (cached,) = _cached(rows, custom, tmp_path / "cache", 64)
    assert (cached.input_ids, cached.labels) == (ex.input_ids, ex.labels)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}\n{{ m['content'] }\n")
    with pytest.raises(ConfigError, match=rf"data.chat_template: {broken}:2: not a Jinja template"):
        load_tokenizer(str(root / TOK), chat_template=str(broken))


def test_cached_and_uncached_paths_agree_on_max_examples_and_bad_lines(tok, tmp_path):
    long_prompt = " ".join(["word"] * 80)
    rows = [{"prompt": "p", "completion": " c0"}, {"prompt": long_prompt, "completion": " x"}]
    rows += [{"prompt": "p", "completion": f" c{i}"} for i in range(1, 6)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    # the second row is dropped (its loss tokens fall past seq_len): both paths give the first 3 usable examples
    uncached = load_examples(path, tok, 16, max_examples=3, **QUIET)
    cached = _cached(path, tok, tmp_path / "cache", 16, max_examples=3)
    assert [e.input_ids for e in cached] == [e.input_ids for e in uncached] and len(uncached) == 3

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n\n{"text": "also fine"}\n{"text": ""}\n')
    for load in (lambda: load_examples(bad, tok, 16), lambda: _cached(bad, tok, tmp_path / "cache2", 16)):
        with pytest.raises(DataError, match=rf"^{bad}:4: field 'text' is empty"):
            load()
    malformed = tmp_path / "malformed.jsonl"
    malformed.write_text('{"text": "fine"}\n{"text": "broken"\n')
    for load in (lambda: load_examples(malformed, tok, 16), lambda: _cached(malformed, tok, tmp_path / "cache3", 16)):
        with pytest.raises(DataError, match=rf"^{malformed}:2: malformed JSON"):
            load()
