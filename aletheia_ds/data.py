"""Files -> tokenized examples -> right-padded batches. No distributed calls: ranks pass their own index.

Formats, detected per row (one format per file):
  {"text": str}                          loss on every token
  {"prompt": str, "completion": str}     loss on the completion only
  {"messages": [{"role", "content"}]}    loss on assistant turns; the tokenizer's chat template when it has one
  {"prompt", "chosen", "rejected"}       a preference pair (train.objective dpo/simpo): strings, or chat messages
                                         (prompt: the conversation so far; chosen/rejected: the assistant turns);
                                         two rows, loss on each completion only (PreferencePair)
Sources: JSONL (read here line by line so errors can name the line), parquet, a `datasets` directory
(saved with `save_to_disk`), both read through `datasets`; with data.cache_dir, aletheia_ds.data_cache reads
every source through `datasets` instead. Several sources are interleaved by weight (`mixture`); packed rows
keep their examples apart (`PackedRows`, `model_inputs`).

Handling, documented (docs/RELIABILITY.md lists the inputs tried):
  - blank JSONL lines are skipped; a UTF-8 byte-order mark at the start of the file is ignored;
  - rows longer than seq_len are truncated on the right and counted in the log (a huge line is read and
    tokenized whole first: its cost is linear in its length);
  - a row whose loss tokens all fall past seq_len is dropped and counted (reported, and an error if every
    row is dropped);
  - an empty `prompt` is allowed (the completion is learned from the start); an empty `text`/`completion`,
    a prompt without a completion, a wrong type, invalid Unicode (lone surrogates), malformed or too deeply
    nested JSON, non-UTF-8 bytes and a chat template that rejects a conversation are errors naming the
    file and line.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import torch

from .config import ConfigError

IGNORE = -100
# the roles of OpenAI-style chat data that chat templates know; the loss is on assistant turns
CHAT_ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    position_ids: Optional[list[int]] = None  # packed rows only: restarting at 0 where each example starts


@dataclass
class PreferencePair:
    """One {prompt, chosen, rejected} row: prompt + chosen and prompt + rejected, prompt tokens labelled IGNORE."""

    chosen: Example
    rejected: Example


class DataError(ConfigError):
    pass


def truncate(example: Example | PreferencePair, seq_len: int) -> Example | PreferencePair:
    """The first seq_len tokens (of each side of a pair)."""
    if isinstance(example, PreferencePair):
        return PreferencePair(truncate(example.chosen, seq_len), truncate(example.rejected, seq_len))
    return Example(example.input_ids[:seq_len], example.labels[:seq_len])


def has_loss_tokens(example: Example | PreferencePair) -> bool:
    """A label to predict past the first token (on both sides of a pair: a side without one has no log-prob)."""
    if isinstance(example, PreferencePair):
        return has_loss_tokens(example.chosen) and has_loss_tokens(example.rejected)
    return any(label != IGNORE for label in example.labels[1:])


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # editors on Windows start UTF-8 files with a BOM
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not UTF-8 (byte {err.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                hint = "; the file must be JSON Lines, one object per line" if line.strip() in ("[", "{") else ""
                raise DataError(f"{path}:{number}: malformed JSON ({err.msg} at column {err.colno}){hint}") from None
            except RecursionError:
                raise DataError(f"{path}:{number}: JSON nested too deeply to read") from None
            except ValueError as err:  # e.g. an integer past Python's digit limit
                raise DataError(f"{path}:{number}: unreadable JSON value ({str(err).split(';')[0]})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    return rows


def read_rows(source: str | Path) -> list[tuple[str, dict]]:
    """[(where, row)] in file order; `where` is 'file:line' or 'file[row]'."""
    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except (FileNotFoundError, ValueError) as err:
            raise DataError(f"{path}: not a datasets directory saved with save_to_disk ({err})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
            ds = ds["train"]
        return [(f"{path}[{i}]", dict(row)) for i, row in enumerate(ds)]
    if path.suffix == ".parquet":
        import datasets

        try:
            ds = datasets.Dataset.from_parquet(str(path))
        except Exception as err:  # pyarrow raises several unrelated types for a bad file
            raise DataError(f"{path}: cannot read parquet ({type(err).__name__}: {err})") from None
        return [(f"{path}[{i}]", dict(row)) for i, row in enumerate(ds)]
    if path.suffix in (".jsonl", ".json") or path.suffix == "":
        return [(f"{path}:{n}", row) for n, row in _read_jsonl(path)]
    raise DataError(f"{path}: unknown data format {path.suffix!r}; use .jsonl, .parquet or a datasets directory")


def row_format(row: dict, where: str) -> str:
    if "chosen" in row or "rejected" in row:
        return "preference"
    if "messages" in row:
        return "messages"
    if "prompt" in row or "completion" in row:
        return "prompt_completion"
    if "text" in row:
        return "text"
    raise DataError(
        f"{where}: row has none of the fields text, prompt/completion, messages (fields: {sorted(row)[:10]})"
    )


def _check_unicode(value: str, field: str, where: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON may escape lone surrogates ("\ud800"); tokenizers reject them
        raise DataError(
            f"{where}: field {field!r} holds invalid Unicode ({value[err.start]!r} at character "
            f"{err.start}, a lone surrogate); fix the text"
        ) from None
    return value


def _string(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    value = row.get(key)
    if not isinstance(value, str):
        missing = " (missing)" if key not in row else ""
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}{missing}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return _check_unicode(value, key, where)


def _checked_messages(messages, where: str, field: str = "messages") -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: {field!r} must be a non-empty list of {{role, content}}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {field}[{i}] must be {{'role': str, 'content': str}}")
        _check_unicode(m["role"], f"{field}[{i}].role", where)
        _check_unicode(m["content"], f"{field}[{i}].content", where)
        if m["role"] not in CHAT_ROLES:
            # an unknown role would be rendered as text, and a misspelt "assistant" silently drops its turn
            # from the loss
            close = difflib.get_close_matches(m["role"], CHAT_ROLES, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(
                f"{where}: {field}[{i}].role {m['role'][:40]!r} is not one of {', '.join(CHAT_ROLES)}{hint}"
            )
    return messages


class Tokenize:
    """Row -> Example for one tokenizer; knows BOS/EOS and the chat template."""

    def __init__(self, tokenizer, seq_len: int):
        self.tok = tokenizer
        self.seq_len = seq_len
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []

    def _ids(self, text: str, special: bool) -> list[int]:
        return list(self.tok(text, add_special_tokens=special)["input_ids"])

    def __call__(self, row: dict, where: str, fmt: str) -> Example | PreferencePair:
        if fmt == "preference":
            return self._preference(row, where)
        if fmt == "text":
            ids = self._ids(_string(row, "text", where), True) + self.eos
            return Example(ids, list(ids))
        if fmt == "prompt_completion":
            prompt = self._ids(_string(row, "prompt", where, allow_empty=True), True)
            completion = self._ids(_string(row, "completion", where), False) + self.eos
            return Example(prompt + completion, [IGNORE] * len(prompt) + completion)
        return self._messages(row, where)

    def _render(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        if getattr(self.tok, "chat_template", None):
            out = self.tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
            return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)
        # no template: a plain documented layout, "role: content" lines, EOS after assistant turns
        ids = []
        for message in messages:
            ids += self._ids(f"{message['role']}: {message['content']}\n", not ids)
            if message["role"] == "assistant":
                ids += self.eos
        if generation_prompt:
            ids += self._ids("assistant: ", not ids)
        return ids

    def _preference(self, row: dict, where: str) -> PreferencePair:
        """TRL's explicit-prompt preference rows: all three fields strings, or all three chat messages."""
        for key in ("prompt", "chosen", "rejected"):
            if key not in row:
                raise DataError(
                    f"{where}: a preference row needs prompt, chosen and rejected; {key!r} is missing"
                    + (" (put the shared conversation start in 'prompt')" if key == "prompt" else "")
                )
        if isinstance(row["prompt"], str):
            prompt = self._ids(_string(row, "prompt", where, allow_empty=True), True)
            sides = [self._ids(_string(row, key, where), False) + self.eos for key in ("chosen", "rejected")]
            return PreferencePair(*(Example(prompt + side, [IGNORE] * len(prompt) + side) for side in sides))
        if not isinstance(row["prompt"], list):
            raise DataError(
                f"{where}: field 'prompt' must be a string or a list of chat messages, "
                f"got {type(row['prompt']).__name__}"
            )
        prompt_messages = _checked_messages(row["prompt"], where, "prompt")
        pair = []
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], list):
                raise DataError(
                    f"{where}: field {key!r} must be chat messages like 'prompt', got {type(row[key]).__name__}"
                )
            side = _checked_messages(row[key], where, key)
            if any(m["role"] != "assistant" for m in side):
                raise DataError(f"{where}: {key!r} must hold assistant turns only (the conversation goes in 'prompt')")
            try:
                prompt = self._render(prompt_messages, True)
                full = self._render(prompt_messages + side, False)
            except Exception as err:  # jinja2 TemplateError (raise_exception in the template), TypeError, ...
                message = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
                raise DataError(
                    f"{where}: the tokenizer's chat template rejects this conversation ({message})"
                ) from None
            if full[: len(prompt)] != prompt:
                raise DataError(
                    f"{where}: the chat template does not render the prompt as the start of the conversation; "
                    "convert the data to string prompt/chosen/rejected"
                )
            pair.append(Example(full, [IGNORE] * len(prompt) + full[len(prompt) :]))
        return PreferencePair(*pair)

    def _messages(self, row: dict, where: str) -> Example:
        messages = _checked_messages(row.get("messages"), where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: messages has no assistant turn to learn from")
        try:
            return self._label_assistant_turns(messages, where)
        except DataError:
            raise
        except Exception as err:  # jinja2 TemplateError (raise_exception in the template), TypeError, ...
            message = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
            raise DataError(f"{where}: the tokenizer's chat template rejects this conversation ({message})") from None

    def _label_assistant_turns(self, messages: list[dict], where: str) -> Example:
        full = self._render(messages, False)
        labels = [IGNORE] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            start = len(self._render(messages[:i], True)) if i else 0
            upto = self._render(messages[: i + 1], False)
            if full[: len(upto)] != upto:
                raise DataError(
                    f"{where}: the chat template does not render conversations prefix by prefix; "
                    "convert the data to prompt/completion"
                )
            labels[start : len(upto)] = full[start : len(upto)]
        return Example(full, labels)


def load_examples(
    source: str | Path, tokenizer, seq_len: int, max_examples: int | None = None, log=print
) -> list[Example]:
    """The usable examples of `source` in file order; `max_examples`: the first N usable ones (rows dropped for
    data.seq_len do not count), as the cached path (aletheia_ds.data_cache) counts them."""
    rows = read_rows(source)
    if not rows:
        raise DataError(f"{source}: the dataset is empty")
    fmt = row_format(rows[0][1], rows[0][0])
    tokenize = Tokenize(tokenizer, seq_len)
    examples, dropped, truncated, seen = [], 0, 0, 0
    for where, row in rows:
        if max_examples and len(examples) == max_examples:
            break
        seen += 1
        if row_format(row, where) != fmt:
            raise DataError(
                f"{where}: row is {row_format(row, where)} but the file started as {fmt}; use one format per file"
            )
        ex = tokenize(row, where, fmt)
        cut = truncate(ex, seq_len)
        if not has_loss_tokens(cut):
            dropped += 1
            continue
        truncated += max(len(side.input_ids) for side in _sides(ex)) > seq_len
        examples.append(cut)
    if truncated:
        log(f"data: {source}: truncated {truncated} of {seen} rows to data.seq_len={seq_len} tokens")
    if dropped:
        log(
            f"data: {source}: dropped {dropped} of {seen} rows whose loss tokens all fall past "
            f"data.seq_len={seq_len} (raise data.seq_len to keep them)"
        )
    if not examples:
        raise DataError(f"{source}: no usable rows: every row's loss tokens fall past data.seq_len={seq_len}")
    return examples


def _sides(example: Example | PreferencePair) -> tuple[Example, ...]:
    return (example.chosen, example.rejected) if isinstance(example, PreferencePair) else (example,)


def example_lengths(examples: Sequence[Example]) -> list[int]:
    """Tokens per example; memory-mapped rows answer from their Arrow offsets without reading the tokens."""
    if hasattr(examples, "lengths"):
        return examples.lengths()
    return [len(ex.input_ids) for ex in examples]


class PackedRows(Sequence[Example]):
    """Whole examples placed one after another into rows of at most seq_len tokens, in order.

    Examples stay apart: each one's position ids restart at 0 (what transformers reads as packed sequences:
    a block-diagonal causal mask for sdpa/eager, variable-length kernels for flash attention; see model_inputs)
    and its first label is IGNORE, since that token would otherwise be predicted from the previous example. So
    every example's loss is what it is unpacked. Only the row boundaries are held; a row's tokens are read from
    `examples` when it is asked for (memory-mapped rows stay memory-mapped).
    """

    def __init__(self, examples: Sequence[Example], seq_len: int):
        self.examples = examples
        self.starts = [0]  # row r holds examples [starts[r], starts[r + 1])
        width = 0
        for index, length in enumerate(example_lengths(examples)):
            if width and width + length > seq_len:
                self.starts.append(index)
                width = 0
            width += length
        self.starts.append(len(examples))

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, row):
        if isinstance(row, slice):
            return [self[r] for r in range(*row.indices(len(self)))]
        row = range(len(self))[row]  # negative indices, and IndexError past the end
        ids, labels, positions = [], [], []
        for index in range(self.starts[row], self.starts[row + 1]):
            ex = self.examples[index]
            ids += ex.input_ids
            labels += [IGNORE, *ex.labels[1:]]
            positions += range(len(ex.input_ids))
        return Example(ids, labels, positions)


def pack(examples: Sequence[Example], seq_len: int) -> PackedRows:
    return PackedRows(examples, seq_len)


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; pad labels are IGNORE and the attention mask is 0 there.

    Packed rows also carry `position_ids`; a row's padding restarts at 0 too, so it forms a block of its own.
    Preference pairs become 2B rows, TRL's layout: the chosen sides, then the rejected ones
    (aletheia_ds.objectives reads them so).
    """
    if isinstance(examples[0], PreferencePair):
        examples = [pair.chosen for pair in examples] + [pair.rejected for pair in examples]
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    packed = examples[0].position_ids is not None
    positions = torch.zeros((len(examples), width), dtype=torch.long) if packed else None
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        mask[row, :n] = 1
        if packed:
            positions[row, :n] = torch.tensor(ex.position_ids)
            positions[row, n:] = torch.arange(width - n)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return {**batch, "position_ids": positions} if packed else batch


def varlen_attention(attn_implementation: Optional[str]) -> bool:
    """Flash attention kernels (flash_attention_2/3, hub kernels) take packed examples from one flattened row."""
    return "flash" in (attn_implementation or "")


def model_inputs(batch: dict[str, torch.Tensor], attn_implementation: Optional[str]) -> dict[str, torch.Tensor]:
    """The forward's arguments for a collated batch.

    A packed batch (it has position_ids) goes without its 2-D padding mask: transformers then finds the
    examples from position ids restarting at 0 (its flattening-collator convention) and builds the
    block-diagonal causal mask itself for sdpa, eager and flex attention. Flash attention's variable-length
    path reads them from a single row, so for it the rows are flattened into one, padding left out.
    """
    if "position_ids" not in batch:
        return batch
    inputs = {key: value for key, value in batch.items() if key != "attention_mask"}
    if varlen_attention(attn_implementation):
        real = batch["attention_mask"].bool()
        inputs = {key: value[real].unsqueeze(0) for key, value in inputs.items()}
    return inputs


def check_packing(attn_implementation: Optional[str]) -> None:
    """Packing keeps examples apart only where transformers derives masks from position ids."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    name = attn_implementation or "sdpa"
    if not varlen_attention(name) and name not in ALL_MASK_ATTENTION_FUNCTIONS:
        raise ConfigError(
            f"data.packing: attention implementation {name!r} does not keep packed examples apart; "
            "use model.attn_implementation=sdpa, eager or flash_attention_2, or data.packing=false"
        )


def mixture(
    parts: Sequence[Sequence[Example]],
    weights: Sequence[float],
    seed: int,
    until: str,
    names: Sequence[str],
    log: Callable[[str], None] = print,
) -> Sequence[Example]:
    """Several sources' examples interleaved at random in proportion to `weights`, the same order for a seed.

    `until`: "first_exhausted" stops when the first source runs out (no example twice), "all_exhausted" when
    every source has (the others start over). The order is drawn by datasets.interleave_datasets over the
    examples' (source, index) pairs only, then applied to lists and memory-mapped rows alike.
    """
    if len(parts) == 1:
        return parts[0]
    import datasets
    import numpy as np

    total = sum(weights)
    pairs = [
        datasets.Dataset.from_dict({"source": np.full(len(part), number), "index": np.arange(len(part))})
        for number, part in enumerate(parts)
    ]
    order = datasets.interleave_datasets(
        pairs, probabilities=[w / total for w in weights], seed=seed, stopping_strategy=until
    ).with_format("numpy")
    offsets = np.cumsum([0, *(len(part) for part in parts)])
    chosen = offsets[order["source"]] + order["index"]
    taken = np.bincount(order["source"], minlength=len(parts))
    counts = ", ".join(f"{name}: {count} of {len(part)} examples" for name, count, part in zip(names, taken, parts))
    log(f"data: mixture of {counts} (data.mix_until={until})")
    combined = parts[0]
    for part in parts[1:]:
        combined = combined + part
    if hasattr(combined, "take"):
        return combined.take(chosen.tolist())
    return [combined[int(i)] for i in chosen]


def fixed_batches(examples: Sequence[Example], batch_size: int, count: int, pad_id: int) -> list[dict]:
    """`count` batches of `batch_size` examples in order (fewer if the data runs out)."""
    out = []
    for b in range(count):
        chunk = examples[b * batch_size : (b + 1) * batch_size]
        if not chunk:
            break
        out.append(collate(chunk, pad_id))
    return out


def shard_indices(count: int, rank: int, world_size: int) -> list[int | None]:
    """Round-robin share of `count` items for `rank`, padded with None to the same length on every rank.

    ZeRO-3 gathers parameters collectively, so every rank must run the same number of passes; a None
    pass repeats some batch with weight 0.
    """
    passes = math.ceil(count / world_size)
    return [i if (i := step * world_size + rank) < count else None for step in range(passes)]


def epoch_order(count: int, seed: int, epoch: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(count, generator=generator).tolist()


class StepSchedule:
    """Deterministic data order: optimizer step s uses examples [s*G, (s+1)*G) of the concatenated epochs.

    G = world_size x grad_accum x micro_batch_size. Resuming needs only the step number; a rank's share
    depends on its index alone. (Hand-written rather than DataLoader + DistributedSampler because exact
    resume at any step, for any accumulation, is one multiplication here.)
    """

    def __init__(self, count: int, micro_batch_size: int, grad_accum: int, world_size: int, seed: int):
        self.count, self.mbs, self.accum, self.world, self.seed = count, micro_batch_size, grad_accum, world_size, seed
        self.global_batch = micro_batch_size * grad_accum * world_size
        self._orders: dict[int, list[int]] = {}

    def steps_for_epochs(self, epochs: float) -> int:
        return max(1, math.ceil(epochs * self.count / self.global_batch))

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.count)
        if epoch not in self._orders:
            self._orders = {epoch: epoch_order(self.count, self.seed, epoch)}
        return self._orders[epoch][offset]

    def epoch_of(self, step: int) -> float:
        return step * self.global_batch / self.count

    def micro_batches(self, step: int, rank: int) -> Iterator[list[int]]:
        base = step * self.global_batch
        for micro in range(self.accum):
            # rank-major inside each micro-batch slot, so world size changes only who gets what
            start = base + (micro * self.world + rank) * self.mbs
            yield [self._index(p) for p in range(start, start + self.mbs)]


def fingerprint(examples: Sequence[Example]) -> str:
    """sha256 of the tokenized rows (ids and labels): same data, tokenizer and truncation, same digest."""
    import hashlib
    from array import array

    digest = hashlib.sha256()
    for ex in (side for example in examples for side in _sides(example)):
        digest.update(array("q", [len(ex.input_ids)]).tobytes())
        digest.update(array("q", ex.input_ids).tobytes())
        digest.update(array("q", ex.labels).tobytes())
    return digest.hexdigest()


def split_eval(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Hold out the last `fraction` of examples (at least one when fraction > 0 and there are two)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    held = max(1, int(len(examples) * fraction))
    return examples[:-held], examples[-held:]


def read_chat_template(path: str | Path) -> str:
    """A Jinja chat template file's text, checked to compile (the error names the file and line)."""
    from jinja2 import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"data.chat_template: cannot read {str(path)!r} ({err})") from None
    if not text.strip():
        raise ConfigError(f"data.chat_template: {path} is empty")
    try:  # the environment transformers renders chat templates in
        ImmutableSandboxedEnvironment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except TemplateSyntaxError as err:
        raise ConfigError(f"data.chat_template: {path}:{err.lineno}: not a Jinja template ({err.message})") from None
    return text


def load_tokenizer(path: str, trust_remote_code: bool = False, chat_template: Optional[str] = None):
    """The tokenizer at `path`; `chat_template` (data.chat_template): a Jinja file that replaces its template."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"model.tokenizer: cannot load a tokenizer from {path!r} ({str(err).splitlines()[0]})"
        ) from None
    if tok.pad_token_id is None:
        if tok.eos_token_id is None:
            raise ConfigError(f"model.tokenizer: {path!r} has neither a pad nor an eos token; add a pad_token")
        tok.pad_token = tok.eos_token
    if chat_template:
        tok.chat_template = read_chat_template(chat_template)  # data_cache.cache_key reads it from here
    return tok
