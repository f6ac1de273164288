"""python tools/make_tiny_example.py [--out examples/tiny] [--weights-only | --preferences]

Writes the embedded default deterministically: arithmetic word problems as prompt/completion JSONL
(train + held-out), a byte-level BPE tokenizer trained on them (with a chat template), and a tiny
Llama config sized to that tokenizer; these are committed. `--weights-only` adds the base model's
seeded random weights (model.safetensors, ~7 MB, not committed), which scripts/demo.sh makes first.
`--preferences` derives preference pairs from the committed rows (prefs_train.jsonl, prefs_eval.jsonl: the
right completion chosen, the same working with a wrong result rejected), for train.objective=dpo/simpo.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from _common import random_model

NAMES = ["Ada", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana", "Ivo", "Juno", "Kai", "Lena"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "shells", "stamps", "tickets"]


def problem(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b, c = rng.randint(2, 40), rng.randint(2, 30), rng.randint(1, 9)
    kind = rng.randrange(4)
    if kind == 0:
        prompt = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have?"
        work, answer = f"{a} + {b} = {a + b}", a + b
    elif kind == 1:
        a = a + b
        prompt = f"{name} has {a} {item} and gives away {b}. How many {item} are left?"
        work, answer = f"{a} - {b} = {a - b}", a - b
    elif kind == 2:
        prompt = f"{name} buys {c} boxes of {b} {item}. How many {item} is that?"
        work, answer = f"{c} * {b} = {c * b}", c * b
    else:
        prompt = f"{name} has {a} {item}, gets {b} more, then gives away {c}. How many {item} now?"
        work, answer = f"{a} + {b} - {c} = {a + b - c}", a + b - c
    return {"prompt": f"Question: {prompt}\nAnswer:", "completion": f" {work}. The answer is {answer}."}


CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}<|eos|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def preference_pair(row: dict, rng: random.Random) -> dict:
    """{prompt, chosen, rejected}: the row's completion, and one whose result (working and answer) is off."""
    work, answer = row["completion"].removeprefix(" ").removesuffix(".").split(". The answer is ")
    wrong = int(answer) + rng.choice([-3, -2, -1, 1, 2, 3, 10])
    rejected = f" {work.rsplit('= ', 1)[0]}= {wrong}. The answer is {wrong}."
    return {"prompt": row["prompt"], "chosen": row["completion"], "rejected": rejected}


def write_preferences(out: Path, seed: int, train: int = 400, held_out: int = 64) -> None:
    rng = random.Random(seed)
    for source, name, count in (
        ("train.jsonl", "prefs_train.jsonl", train),
        ("eval.jsonl", "prefs_eval.jsonl", held_out),
    ):
        rows = [json.loads(line) for line in (out / source).read_text(encoding="utf-8").splitlines()[:count]]
        with (out / name).open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(preference_pair(row, rng)) + "\n")
        print(f"wrote {out / name}: {len(rows)} preference pairs")


def build_tokenizer(texts: list[str], out: Path, vocab_size: int) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return len(fast)


def write_weights(model_dir: Path, seed: int) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    model = random_model(config, dtype=torch.float32, device=torch.device("cpu"), seed=seed)

    # weights only: save_pretrained would rewrite the committed config.json
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    print(f"wrote {model_dir}/model.safetensors ({sum(p.numel() for p in model.parameters()):,} parameters)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="examples/tiny")
    parser.add_argument("--train", type=int, default=2000)
    parser.add_argument("--eval", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--weights-only", action="store_true", help="write seeded base weights for model/")
    parser.add_argument("--preferences", action="store_true", help="write preference pairs from the rows")
    args = parser.parse_args()
    out = Path(args.out)
    if args.preferences:
        write_preferences(out, args.seed)
        return
    if args.weights_only:
        write_weights(out / "model", args.seed)
        return
    rng = random.Random(args.seed)
    rows = [problem(rng) for _ in range(args.train + args.eval)]
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.jsonl", rows[: args.train]), ("eval.jsonl", rows[args.train :])):
        with (out / name).open("w", encoding="utf-8") as handle:
            for row in part:
                handle.write(json.dumps(row) + "\n")
    vocab = build_tokenizer([r["prompt"] + r["completion"] for r in rows], out / "tokenizer", 512)
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_hidden_layers": 8,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 0,
        "initializer_range": 0.02,
    }
    (out / "model").mkdir(exist_ok=True)
    (out / "model" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    print(f"wrote {out}: {args.train} train / {args.eval} held-out rows, vocab {vocab}")


if __name__ == "__main__":
    main()
