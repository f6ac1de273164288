"""Hypothesis fuzzing of the data loader (aletheia_ds/data.py) and the config loader (aletheia_ds/config.py).

Every input is either loaded or refused with one line (DataError / ConfigError) that names the file and
line or the knob; nothing raises anything else, and no row disappears without being counted in the log.
Inputs: malformed JSON, wrong types, empty strings, huge lines, non-UTF-8 bytes, invalid Unicode, deep
nesting, prompts without completion, chat turns the template rejects, YAML of any shape, odd overrides.
"""

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aletheia_ds.config import ConfigError, RunConfig, _known_keys, load_config
from aletheia_ds.data import IGNORE, DataError, load_examples, load_tokenizer

FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def tok(root):
    return load_tokenizer(str(root / "examples/tiny/tokenizer"))


# any character, lone surrogates included (JSON escapes them as \ud800; tokenizers reject them)
any_text = st.text(st.characters(), max_size=40) | st.sampled_from(["", " ", "\n", "\x00", "\ud800", "a\udfffb"])
json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
    max_leaves=6,
)
field = st.sampled_from(["text", "prompt", "completion", "messages", "role", "content", "other"])
turn = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "assistant", "system", "tool", ""]) | json_value,
        "content": any_text | json_value,
    }
)
row = st.one_of(
    st.fixed_dictionaries({"text": any_text}),
    st.fixed_dictionaries({"prompt": any_text, "completion": any_text}),
    st.fixed_dictionaries({"prompt": any_text}),  # a prompt with no completion
    st.fixed_dictionaries({"messages": st.lists(turn, max_size=4)}),
    st.dictionaries(field, json_value, max_size=3),
)
line = st.one_of(
    row.map(lambda r: json.dumps(r).encode()),
    json_value.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=30),  # mostly not UTF-8, not JSON
    st.sampled_from([b"", b"   ", b'\xef\xbb\xbf{"text": "x"}', b"[" * 5000, b'{"text": 1' + b"0" * 5000 + b"}"]),
    st.integers(1_000, 60_000).map(lambda n: json.dumps({"prompt": "word " * n, "completion": " x"}).encode()),
)


def one_line(err: Exception) -> str:
    text = str(err)
    assert text and "\n" not in text, text
    return text


@FUZZ
@given(lines=st.lists(line, max_size=5), seq_len=st.integers(2, 64), sep=st.sampled_from([b"\n", b"\r\n"]))
def test_data_loader_loads_or_names_the_line(tok, tmp_path, lines, seq_len, sep):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(sep.join(lines))
    logged = []
    try:
        examples = load_examples(path, tok, seq_len, log=logged.append)
    except DataError as err:
        assert one_line(err).startswith(str(path)), err  # names the file (and line, for a row)
        return
    dropped = sum(int(m) for text in logged for m in re.findall(r"dropped (\d+) of", text))
    content = path.read_bytes().removeprefix(b"\xef\xbb\xbf")  # a byte-order mark opening the file is ignored
    rows = [chunk for chunk in content.split(b"\n") if chunk.strip()]
    assert len(examples) + dropped == len(rows)  # every row is an example or counted as dropped
    for ex in examples:
        assert 1 <= len(ex.input_ids) == len(ex.labels) <= seq_len
        assert any(label != IGNORE for label in ex.labels[1:])


def test_huge_line_is_truncated_and_counted(tok, tmp_path):
    path = tmp_path / "huge.jsonl"
    path.write_text(json.dumps({"text": "Ada has 3 books. " * 60_000}) + "\n" + json.dumps({"text": "Ben."}) + "\n")
    logged = []
    examples = load_examples(path, tok, 32, log=logged.append)
    assert [len(ex.input_ids) for ex in examples][0] == 32 and len(examples) == 2
    assert logged == [f"data: {path}: truncated 1 of 2 rows to data.seq_len=32 tokens"]


def test_chat_template_rejecting_a_conversation_names_the_line(tmp_path, root):
    import shutil

    tok_dir = tmp_path / "tok"
    shutil.copytree(root / "examples/tiny/tokenizer", tok_dir)
    (tok_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('tool turns are not supported') }}"
        "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
    )
    path = tmp_path / "chat.jsonl"
    path.write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "a"}]})
        + "\n"
        + json.dumps({"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]})
        + "\n"
    )
    with pytest.raises(
        DataError,
        match=r"chat.jsonl:2: the tokenizer's chat template rejects this conversation "
        r"\(tool turns are not supported\)",
    ):
        load_examples(path, load_tokenizer(str(tok_dir)), 64)


def test_parquet_nulls_name_the_row(tok, tmp_path):
    import datasets

    datasets.Dataset.from_list([{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}]).to_parquet(
        str(tmp_path / "d.parquet")
    )
    with pytest.raises(DataError, match=r"d.parquet\[1\]: field 'completion' must be a string, got NoneType"):
        load_examples(tmp_path / "d.parquet", tok, 32)


def test_sequence_longer_than_the_model_allows_is_refused(tmp_path):
    from helpers.ranks import save_tiny_llama

    from aletheia_ds.config import ModelSection
    from aletheia_ds.model import check_sequence_lengths

    model = ModelSection(path=str(save_tiny_llama(tmp_path / "m", family="gpt_neox")))
    check_sequence_lengths(model, {"data.seq_len": 128})
    with pytest.raises(
        ConfigError,
        match=r"data.seq_len=129 exceeds the model's max_position_embeddings=128 "
        r"\(.*\); set data.seq_len <= 128",
    ):
        check_sequence_lengths(model, {"data.seq_len": 129})


# ------------------------------------------------------------------------------------------------ config
KEYS = _known_keys(RunConfig) + [
    "deepspeed.overrides.zero_optimization.stage",
    "deepspeed.overrides.a.b",
    "train",
    "x.y",
    "train.",
    ".lr",
    "deepspeed.overrides.",
]
scalar = st.one_of(
    st.sampled_from(
        [
            "",
            "null",
            "[1, 2]",
            "{a: 1}",
            ".nan",
            ".inf",
            "-1",
            "0",
            "1e400",
            "true",
            "!!python/object/apply:os.system [ls]",
            "&a [*a]",
            "'",
            "1" * 5000,
            "auto",
        ]
    ),
    st.text(max_size=12),
)
override = st.one_of(
    st.tuples(st.sampled_from(KEYS), scalar).map(lambda kv: [f"{kv[0]}={kv[1]}"]),
    st.tuples(st.sampled_from(KEYS), scalar).map(lambda kv: [f"--{kv[0]}", kv[1]]),
    st.text(max_size=15).map(lambda s: [s]),
)
yaml_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from([k.split(".")[-1] for k in KEYS if k.split(".")[-1]]), inner, max_size=3)
    ),
    max_leaves=8,
)
config_file = st.one_of(
    st.dictionaries(
        st.sampled_from(["model", "data", "probe", "plan", "lora", "train", "deepspeed", "trian"]),
        yaml_value,
        max_size=4,
    ).map(lambda tree: json.dumps(tree).encode()),  # JSON is YAML
    st.binary(max_size=40),
    st.text(max_size=60).map(str.encode),
)


@FUZZ
@given(overrides=st.lists(override, max_size=4), text=st.none() | config_file)
def test_config_loader_loads_or_names_the_knob(tmp_path, overrides, text):
    argv = [arg for group in overrides for arg in group]
    if text is not None:
        (tmp_path / "c.yaml").write_bytes(text)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    try:
        cfg = load_config(argv)
    except ConfigError as err:
        one_line(err)
        return
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr > 0 and cfg.data.seq_len >= 2 and cfg.train.micro_batch_size >= 1
