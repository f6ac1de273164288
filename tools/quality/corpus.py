"""The pretraining corpus: whatever offline text this machine has, read and recorded.

Sources, in order, each up to its share of --corpus-mb (a source short of its share leaves the rest to
the next): the interpreter's standard library (.py/.rst/.md/.txt), /usr/share/doc (plain and gzipped
text), /usr/share/man (gzipped troff, markup stripped), then site-packages. `--corpus-extra DIR` adds a
carried directory (e.g. man pages and docs copied from another machine) read the same way. One file in
--held-out-every is held out by path hash (the forgetting measure); `stats` records what was used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

TEXT_SUFFIXES = (".py", ".rst", ".md", ".txt")
SKIP_DIRS = {"__pycache__", "site-packages", "dist-packages", ".git"}
MAX_FILE_BYTES = 400_000  # larger files are generated tables, not prose or code


def key_hash(key: str) -> int:
    return int(hashlib.sha1(key.encode()).hexdigest()[:12], 16)


def is_held_out(key: str, held_out_every: int) -> bool:
    return key_hash("held-out:" + key) % held_out_every == 0


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _walk(root: Path, prefix: str, accept) -> list[tuple[str, Path]]:
    found = []
    for directory, subdirs, files in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if d not in SKIP_DIRS)
        for name in files:
            path = Path(directory) / name
            if accept(name):
                try:
                    size = path.stat().st_size
                except OSError:
                    continue
                if 0 < size <= MAX_FILE_BYTES:
                    found.append((f"{prefix}/{path.relative_to(root)}", path))
    # a hash order spreads a partial take over many packages instead of the alphabet's first few
    return sorted(found, key=lambda item: key_hash(item[0]))


def _doc_name(name: str) -> bool:
    plain = name[:-3] if name.endswith(".gz") else name
    return plain.endswith((".txt", ".md", ".rst")) or plain.split(".")[0] in (
        "README",
        "NEWS",
        "changelog",
        "copyright",
        "TODO",
        "FAQ",
    )


def _man_name(name: str) -> bool:
    return name.endswith(".gz") and re.search(r"\.\d\w*\.gz$", name) is not None


_TROFF_ESCAPE = re.compile(r"\\f[BIRP]|\\f\(..|\\\(..|\\[&\-e|^]")


def strip_troff(text: str) -> str:
    """Man-page source -> readable text: comment and macro-only lines dropped, font escapes removed."""
    lines = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            macro, _, rest = line.partition(" ")
            if macro in (".SH", ".SS", ".B", ".I", ".BR", ".IR", ".IP", ".TP", ".BI", ".RB", ".RI"):
                line = rest.replace('"', "")
            else:
                continue
        lines.append(_TROFF_ESCAPE.sub("", line))
    return "\n".join(lines)


def _read(path: Path, kind: str) -> str | None:
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None
    return strip_troff(text) if kind == "man" else text


def _readable(text: str) -> bool:
    lines = text.count("\n") + 1
    return bool(text.strip()) and "\x00" not in text and len(text) / lines < 160  # minified or data-like


def sources(extra: str = "") -> list[tuple[str, Path, object, str]]:
    """(name, root, file filter, reader kind) of every source present on this machine."""
    found = [("stdlib", stdlib_root(), lambda n: n.endswith(TEXT_SUFFIXES), "text")]
    for name, root, accept, kind in (
        ("doc", Path("/usr/share/doc"), _doc_name, "text"),
        ("man", Path("/usr/share/man"), _man_name, "man"),
    ):
        if root.is_dir():
            found.append((name, root, accept, kind))
    for directory in filter(None, extra.split(",")):
        root = Path(directory)
        if root.is_dir():
            found.append(
                (
                    f"extra:{root.name}",
                    root,
                    lambda n: _doc_name(n) or _man_name(n) or n.endswith(TEXT_SUFFIXES),
                    "auto",
                )
            )
    for key in ("purelib", "platlib"):
        path = Path(sysconfig.get_paths()[key])
        if path.is_dir() and all(path != root for _, root, _, _ in found):
            found.append(("site", path, lambda n: n.endswith(TEXT_SUFFIXES), "text"))
    return found


@dataclass
class Corpus:
    train: list[str]
    held_out: list[str]
    stats: dict


def load_corpus(target_mb: float, held_out_every: int, mix: dict[str, float], extra: str = "") -> Corpus:
    """Text from every source up to its share (`mix`: source name -> fraction; unnamed sources share the
    rest); held-out files chosen by path hash."""
    found = sources(extra)
    target = int(target_mb * 1e6)
    named = {name for name, *_ in found if name in mix}
    rest = max(0.0, 1.0 - sum(mix.get(n, 0.0) for n in named))
    unnamed = [name for name, *_ in found if name not in mix]
    train, held_out, per_source, carry = [], [], {}, 0
    for name, root, accept, kind in found:
        share = mix.get(name, rest / max(1, len(unnamed)))
        quota, taken = int(share * target) + carry, 0
        for key, path in _walk(root, name, accept):
            if taken >= quota:
                break
            reader = ("man" if _man_name(path.name) else "text") if kind == "auto" else kind
            text = _read(path, reader)
            if text is None or not _readable(text):
                continue
            (held_out if is_held_out(key, held_out_every) else train).append(text)
            taken += len(text)
        carry = max(0, quota - taken)  # a thin source leaves its share to the next one
        per_source[name] = {"root": str(root), "chars": taken}
    if not held_out or not train:
        raise SystemExit(f"corpus: too little text under {[str(r) for _, r, _, _ in found]}; raise --corpus-mb")
    stats = {
        "sources": per_source,
        "train_files": len(train),
        "held_out_files": len(held_out),
        "train_chars": sum(map(len, train)),
        "held_out_chars": sum(map(len, held_out)),
        "missing": [p for p in ("/usr/share/doc", "/usr/share/man") if not Path(p).is_dir()],
    }
    return Corpus(train, held_out, stats)


def train_tokenizer(texts: list[str], vocab_size: int, sample_chars: int):
    """Byte-level BPE on the first `sample_chars` of the training files (any text encodes: byte fallback).

    The files are taken round-robin over the corpus order, so every source is in the sample."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    sample, size = [], 0
    stride = max(1, len(texts) // 2000)
    for text in texts[::stride] + texts:
        if size >= sample_chars:
            break
        sample.append(text)
        size += len(text)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|pad|>", "<|bos|>", "<|eos|>"],
        min_frequency=2,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(sample, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")


def encode_documents(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents as one token stream, EOS after each (int32: the stream is the corpus's biggest object)."""
    backend = tokenizer.backend_tokenizer
    eos = torch.tensor([tokenizer.eos_token_id], dtype=torch.int32)
    pieces = []
    for start in range(0, len(texts), 512):
        for encoding in backend.encode_batch(texts[start : start + 512], add_special_tokens=False):
            pieces += [torch.tensor(encoding.ids, dtype=torch.int32), eos]
    return torch.cat(pieces)


def windows(stream: torch.Tensor, width: int, count: int) -> torch.Tensor:
    """`count` consecutive non-overlapping windows of `width` tokens (fewer if the stream is short)."""
    count = min(count, (len(stream) - 1) // width)
    return stream[: count * width].view(count, width)
