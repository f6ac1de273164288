"""Tokenize once, memory-map everywhere: a `datasets` Arrow cache of tokenized examples (data.cache_dir).

The first rank of each node (local rank 0; or global rank 0 with data.cache_shared=true, when cache_dir is on
a file system every node sees) reads the source through `datasets` (memory-mapped Arrow; JSONL / JSON /
parquet / CSV / Arrow files and save_to_disk folders), tokenizes it with data.num_proc worker processes and
writes <cache_dir>/<key>/ with save_to_disk; the other ranks wait at a barrier and memory-map that folder,
so no rank holds the rows as Python objects. A second run with the same key starts from the cache.

The key covers everything the tokens depend on: each source file's path, size and modification time, the
tokenizer (its vocabulary and special tokens), the chat template (data.chat_template included), seq_len and
packing. Rows are formatted and labelled by aletheia_ds.data.Tokenize, the same code as the uncached path, so the
examples are identical; max_examples counts usable examples as the uncached path does, and a bad JSONL row is
named file:line as there (the line found by reading the file again, only when there is an error). The cached
path caches the whole source, so its truncated/dropped counts are over every row.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from .data import IGNORE, DataError, Example, Tokenize, _read_jsonl, row_format

CACHE_VERSION = 1
READERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def _source_files(source: Path) -> list[Path]:
    return sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]


def cache_key(source: str | Path, tokenizer, seq_len: int, packing: bool) -> str:
    """sha256 over what the tokenized rows depend on (file stats, not contents: a 100 GB source is not re-read)."""
    digest = hashlib.sha256()
    files = [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in _source_files(Path(source))]
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    tok = {
        "class": type(tokenizer).__name__,
        "vocab": hashlib.sha256(json.dumps(sorted(vocab.items())).encode()).hexdigest(),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "template": getattr(tokenizer, "chat_template", None) or "",
    }
    digest.update(
        json.dumps(
            {"version": CACHE_VERSION, "files": files, "tokenizer": tok, "seq_len": seq_len, "packing": packing},
            sort_keys=True,
            default=str,
        ).encode()
    )
    return digest.hexdigest()[:32]


def read_dataset(source: str | Path, cache_dir: Path):
    """The source as a memory-mapped `datasets.Dataset` (rows never become a Python list)."""
    import datasets

    path = Path(source)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    reader = None
    try:
        if path.is_dir():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: DatasetDict without a 'train' split (splits: {list(ds)})")
                ds = ds["train"]
            return ds
        reader = READERS.get(path.suffix)
        if reader is None:
            raise DataError(
                f"{path}: unknown data format {path.suffix!r}; use .jsonl, .json, .parquet, .csv, "
                ".arrow or a datasets directory"
            )
        return datasets.load_dataset(reader, data_files=str(path), split="train", cache_dir=str(cache_dir / "raw"))
    except DataError:
        raise
    except Exception as err:  # pyarrow / datasets raise many unrelated types for a bad file
        if reader == "json":
            _read_jsonl(path)  # its error names the line, as the uncached path's does
        raise DataError(f"{path}: cannot read ({type(err).__name__}: {str(err).splitlines()[0][:200]})") from None


class _TokenizeBatch:
    """datasets.map function (picklable for num_proc workers): rows -> input_ids, labels; dropped rows emptied."""

    def __init__(self, tokenizer, seq_len: int, source: str, fmt: str):
        if fmt == "preference":  # two rows per example: the Arrow table holds one
            raise DataError(f"{source}: preference rows (prompt/chosen/rejected) are read without data.cache_dir")
        self.tokenize, self.seq_len, self.source, self.fmt = Tokenize(tokenizer, seq_len), seq_len, source, fmt

    def __call__(self, batch: dict, indices: list[int]) -> dict:
        ids_out, labels_out, truncated = [], [], []
        for offset, index in enumerate(indices):
            row = {key: values[offset] for key, values in batch.items()}
            where = f"{self.source}[{index}]"
            try:
                if row_format(row, where) != self.fmt:
                    raise DataError(
                        f"{where}: row is {row_format(row, where)} but the file started as {self.fmt}; "
                        "use one format per file"
                    )
                ex = self.tokenize(row, where, self.fmt)
            except DataError as err:
                raise DataError(str(err).replace(where, self._line_where(index), 1)) from None
            labels = ex.labels[: self.seq_len]
            keep = any(label != IGNORE for label in labels[1:])
            ids_out.append(ex.input_ids[: self.seq_len] if keep else [])
            labels_out.append(labels if keep else [])
            truncated.append(keep and len(ex.input_ids) > self.seq_len)
        return {"input_ids": ids_out, "labels": labels_out, "truncated": truncated}

    def _line_where(self, index: int) -> str:
        """'file:line' for row `index` of a JSONL file, as the uncached path names it; found by reading the
        file again, which only an error pays for."""
        if Path(self.source).suffix != ".jsonl":
            return f"{self.source}[{index}]"
        with open(self.source, "rb") as handle:
            rows = (number for number, raw in enumerate(handle, start=1) if raw.strip(b" \t\r\n\xef\xbb\xbf"))
            line = next((number for position, number in enumerate(rows) if position == index), None)
        return f"{self.source}:{line}" if line is not None else f"{self.source}[{index}]"


class TokenizedRows(Sequence[Example]):
    """Examples backed by a memory-mapped Arrow table; slices stay memory-mapped."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return TokenizedRows(self.dataset.select(range(*index.indices(len(self)))))
        row = self.dataset[int(index)]
        return Example(row["input_ids"], row["labels"])

    def __iter__(self) -> Iterator[Example]:
        for batch in self.dataset.iter(batch_size=1024):
            yield from (Example(ids, labels) for ids, labels in zip(batch["input_ids"], batch["labels"]))

    def lengths(self) -> list[int]:
        """Tokens per example from the Arrow list offsets alone (the tokens stay on disk)."""
        import pyarrow.compute as pc

        lengths = pc.list_value_length(self.dataset.data.column("input_ids"))
        if self.dataset._indices is not None:  # a select()ed view: its rows are these positions of the table
            lengths = lengths.take(self.dataset._indices.column(0))
        return lengths.to_pylist()

    def take(self, indices: Sequence[int]) -> TokenizedRows:
        return TokenizedRows(self.dataset.select(indices))

    def __add__(self, other):
        import datasets

        if isinstance(other, TokenizedRows):
            return TokenizedRows(datasets.concatenate_datasets([self.dataset, other.dataset]))
        return [*self, *other]


def tokenize_to_cache(
    source: str | Path,
    tokenizer,
    seq_len: int,
    cache_dir: Path,
    num_proc: int,
    packing: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Tokenize `source` into <cache_dir>/<key>/ unless it is there already; returns that folder."""

    target = cache_dir / cache_key(source, tokenizer, seq_len, packing)
    if (target / "dataset_info.json").is_file():
        return target
    raw = read_dataset(source, cache_dir)
    if len(raw) == 0:
        raise DataError(f"{source}: the dataset is empty")
    fmt = row_format(raw[0], f"{source}[0]")
    # the key names the result: datasets' own hashing of the map function (and tokenizer) is not needed
    with _quiet_datasets():
        tokenized = raw.map(
            _TokenizeBatch(tokenizer, seq_len, str(source), fmt),
            batched=True,
            with_indices=True,
            batch_size=1000,
            num_proc=num_proc if num_proc > 1 else None,
            remove_columns=raw.column_names,
            new_fingerprint=target.name,
            load_from_cache_file=False,
        )
    kept = tokenized.filter(
        lambda rows: [len(ids) > 0 for ids in rows],
        input_columns="input_ids",
        batched=True,
        num_proc=num_proc if num_proc > 1 else None,
        new_fingerprint=target.name + "-kept",
    )
    dropped, truncated = len(tokenized) - len(kept), sum(kept["truncated"])
    if truncated:
        log(f"data: {source}: truncated {truncated} of {len(raw)} rows to data.seq_len={seq_len} tokens")
    if dropped:
        log(
            f"data: {source}: dropped {dropped} of {len(raw)} rows whose loss tokens all fall past "
            f"data.seq_len={seq_len} (raise data.seq_len to keep them)"
        )
    if len(kept) == 0:
        raise DataError(f"{source}: no usable rows: every row's loss tokens fall past data.seq_len={seq_len}")
    # one partial folder per writer: with data.cache_shared=false on a file system several nodes see, the first
    # rank of every node tokenizes into the same cache_dir at once
    partial = target.with_name(f".tmp-{target.name}-{socket.gethostname()}-{os.getpid()}")
    kept.remove_columns("truncated").save_to_disk(str(partial))
    try:
        partial.rename(target)  # a killed tokenizer leaves only a .tmp- folder, never a half cache under the key
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "dataset_info.json").is_file():
            raise
        # another node renamed the same tokens (the key names them) into place first
    return target


class _quiet_datasets:
    """datasets' progress bars off while tokenizing (the job prints one line per stage instead)."""

    def __enter__(self):
        import datasets

        self.was = datasets.utils.logging.is_progress_bar_enabled()
        datasets.utils.logging.disable_progress_bar()

    def __exit__(self, *exc):
        import datasets

        if self.was:
            datasets.utils.logging.enable_progress_bar()


def cached_examples(
    source: str | Path,
    tokenizer,
    seq_len: int,
    cache_dir: str | Path,
    num_proc: int,
    tokenizes: bool,
    barrier: Callable[[], None],
    max_examples: Optional[int] = None,
    packing: bool = False,
    log: Callable[[str], None] = print,
) -> TokenizedRows:
    """The tokenized examples of `source`, memory-mapped; `tokenizes` is true on the one rank per node (or per
    job) that builds the cache; every rank calls `barrier` once."""
    import datasets

    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    failure = None
    if tokenizes:
        try:
            tokenize_to_cache(source, tokenizer, seq_len, cache_dir, num_proc, packing, log)
        except DataError as err:  # raised after the barrier, so the waiting ranks are not left hanging
            failure = err
    barrier()
    if failure is not None:
        raise failure
    target = cache_dir / cache_key(source, tokenizer, seq_len, packing)
    if not (target / "dataset_info.json").is_file():
        raise DataError(
            f"data.cache_dir: {target} was not written by the tokenizing rank; with several nodes set "
            "data.cache_shared=false unless data.cache_dir is one shared file system"
        )
    dataset = datasets.load_from_disk(str(target))
    if max_examples:
        dataset = dataset.select(range(min(max_examples, len(dataset))))
    return TokenizedRows(dataset)
