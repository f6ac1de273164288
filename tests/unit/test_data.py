"""Data formats, loss masking, errors that name the line, packing, and the deterministic step schedule."""

import json

import pytest

from aletheia_ds.data import (
    IGNORE,
    DataError,
    StepSchedule,
    collate,
    load_examples,
    load_tokenizer,
    pack,
    read_rows,
    shard_indices,
)

TOK = "examples/tiny/tokenizer"


@pytest.fixture(scope="module")
def tok(root):
    return load_tokenizer(str(root / TOK))


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_prompt_completion_masks_the_prompt(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "Question: 2 + 3?\nAnswer:", "completion": " 5."}])
    (ex,) = load_examples(f, tok, 64)
    prompt = tok("Question: 2 + 3?\nAnswer:")["input_ids"]
    completion = tok(" 5.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert ex.input_ids == prompt + completion
    assert ex.labels == [IGNORE] * len(prompt) + completion


def test_text_trains_on_every_token(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"text": "Ada has 3 books."}])
    (ex,) = load_examples(f, tok, 64)
    assert ex.labels == ex.input_ids and ex.input_ids[-1] == tok.eos_token_id


def test_messages_use_the_chat_template_and_train_on_assistant_turns(tok, tmp_path):
    messages = [
        {"role": "user", "content": "2 + 2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "and 3 + 3?"},
        {"role": "assistant", "content": "6"},
    ]
    f = write_jsonl(tmp_path / "d.jsonl", [{"messages": messages}])
    (ex,) = load_examples(f, tok, 128)
    full = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex.input_ids) == full
    learned = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label != IGNORE])
    assert learned == "4<|eos|>6<|eos|>"


def test_parquet_and_datasets_dir(tok, tmp_path):
    import datasets

    rows = [{"prompt": "p", "completion": f" c{i}"} for i in range(3)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "dsdir"))
    a = load_examples(tmp_path / "d.parquet", tok, 32)
    b = load_examples(tmp_path / "dsdir", tok, 32)
    c = load_examples(write_jsonl(tmp_path / "d.jsonl", rows), tok, 32)
    assert [e.input_ids for e in a] == [e.input_ids for e in b] == [e.input_ids for e in c]


@pytest.mark.parametrize(
    "content,match",
    [
        (b'{"text": "ok"}\n{"text": "broken"\n', r"d.jsonl:2: malformed JSON"),
        (b'{"text": "ok"}\n\xff\xfe\n', r"d.jsonl:2: not UTF-8"),
        (b'["a list"]\n', r"d.jsonl:1: each line must be a JSON object"),
        (b'{"text": 5}\n', r"d.jsonl:1: field 'text' must be a string"),
        (b'{"text": "  "}\n', r"d.jsonl:1: field 'text' is empty"),
        (b'{"prompt": "only a prompt"}\n', r"d.jsonl:1: field 'completion' must be a string"),
        (b'{"foo": 1}\n', r"d.jsonl:1: row has none of the fields"),
        (b'{"text": "a"}\n{"prompt": "p", "completion": "c"}\n', r"d.jsonl:2: row is prompt_completion but"),
        (b"", r"the dataset is empty"),
        (b"\n\n", r"the dataset is empty"),
        (b'{"messages": [{"role": "user", "content": "hi"}]}\n', r"no assistant turn"),
        (
            b'{"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n',
            r"d.jsonl:1: messages\[0\].role 'wizard' is not one of system, user, assistant, tool$",
        ),
        (
            b'{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}, '
            b'{"role": "user", "content": "?"}, {"role": "asistant", "content": "no"}]}\n',
            r"messages\[3\].role 'asistant' is not one of .* \(did you mean 'assistant'\?\)",
        ),
        (b'{"text": "a\\ud800b"}\n', r"d.jsonl:1: field 'text' holds invalid Unicode \('\\ud800' at character 1"),
        (b"[" * 100000 + b"]" * 100000 + b"\n", r"d.jsonl:1: JSON nested too deeply to read"),
        (b'{"text": "x", "n": 1' + b"0" * 5000 + b"}\n", r"d.jsonl:1: unreadable JSON value \(Exceeds the limit"),
        (b'[\n{"text": "x"},\n]\n', r"d.jsonl:1: malformed JSON .* the file must be JSON Lines"),
    ],
)
def test_bad_rows_name_the_line(tok, tmp_path, content, match):
    f = tmp_path / "d.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError, match=match):
        load_examples(f, tok, 32)


def test_byte_order_mark_and_crlf_are_accepted(tok, tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"text": "Ada has 3 books."}\r\n{"text": "Ben has 2."}\r\n')
    plain = write_jsonl(tmp_path / "e.jsonl", [{"text": "Ada has 3 books."}, {"text": "Ben has 2."}])
    assert load_examples(f, tok, 64) == load_examples(plain, tok, 64)


def test_rows_past_seq_len_are_truncated_or_counted(tok, tmp_path):
    long_prompt = "word " * 200
    f = write_jsonl(
        tmp_path / "d.jsonl",
        [{"prompt": long_prompt, "completion": " x"}, {"prompt": "short", "completion": " y" * 100}],
    )
    messages = []
    examples = load_examples(f, tok, 16, log=messages.append)
    assert len(examples) == 1 and len(examples[0].input_ids) == 16
    assert messages[0] == f"data: {f}: truncated 1 of 2 rows to data.seq_len=16 tokens"  # the kept one
    assert "dropped 1 of 2 rows" in messages[1]
    only_long = write_jsonl(tmp_path / "e.jsonl", [{"prompt": long_prompt, "completion": " x"}])
    with pytest.raises(DataError, match="no usable rows"):
        load_examples(only_long, tok, 16, log=lambda _m: None)


def test_pack_and_collate(tok, tmp_path):
    f = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "a", "completion": f" b{i}"} for i in range(20)])
    examples = load_examples(f, tok, 32)
    packed = pack(examples, 16)
    # whole examples, in order, none split and none lost; no row grows past seq_len, and no two neighbours fit one
    assert [t for row in packed for t in row.input_ids] == [t for e in examples for t in e.input_ids]
    assert all(len(row.input_ids) <= 16 for row in packed) and len(packed) < len(examples)
    assert all(len(a.input_ids) + len(examples[packed.starts[r + 1]].input_ids) > 16 for r, a in enumerate(packed[:-1]))
    first = packed[0]
    length = len(examples[0].input_ids)
    assert first.position_ids[: length + 2] == [*range(length), 0, 1]  # positions restart at each example
    assert first.labels[0] == first.labels[length] == IGNORE  # nothing learned across the boundary
    assert first.labels[1:length] == examples[0].labels[1:length]
    batch = collate(examples[:3], tok.pad_token_id)
    short = len(examples[0].input_ids)
    assert batch["attention_mask"][0, short:].sum() == 0 and (batch["labels"][0, short:] == IGNORE).all()
    assert "position_ids" not in batch
    rows = collate([packed[0], packed[-1]], tok.pad_token_id)
    width, last = rows["input_ids"].shape[1], len(packed[-1].input_ids)
    assert rows["position_ids"][1, last:].tolist() == list(range(width - last))  # padding: a block of its own


def test_step_schedule_is_deterministic_and_partitions_the_epoch():
    s = StepSchedule(count=24, micro_batch_size=2, grad_accum=3, world_size=2, seed=7)
    seen = [i for step in range(2) for rank in range(2) for mb in s.micro_batches(step, rank) for i in mb]
    assert sorted(seen) == list(range(24))  # one epoch = 2 steps of 12 examples, each example once
    again = StepSchedule(count=24, micro_batch_size=2, grad_accum=3, world_size=2, seed=7)
    assert list(again.micro_batches(1, 1)) == list(s.micro_batches(1, 1))
    assert list(s.micro_batches(2, 0)) != list(s.micro_batches(0, 0))  # next epoch, new order
    assert s.steps_for_epochs(1.0) == 2 and s.steps_for_epochs(2.5) == 5


def test_shard_indices_pad_to_equal_passes():
    assert shard_indices(3, 0, 2) == [0, 2]
    assert shard_indices(3, 1, 2) == [1, None]
    assert read_rows  # imported for the error tests above
