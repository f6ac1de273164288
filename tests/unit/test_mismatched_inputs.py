"""Inputs that belong to another model or cannot be written, refused in one line before anything heavy runs."""

import pytest

from aletheia_ds.cli import build_parser
from aletheia_ds.config import ConfigError, ModelSection
from aletheia_ds.data import load_tokenizer
from aletheia_ds.model import check_vocabulary
from helpers.ranks import ROOT, save_tiny_llama

TOKENIZER = str(ROOT / "examples/tiny/tokenizer")


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    model = save_tiny_llama(tmp_path / "small_vocab", vocab_size=256)
    with pytest.raises(ConfigError, match=r"^model.tokenizer: .*tokenizer has 512 tokens, the model .* embeds 256"):
        check_vocabulary(ModelSection(path=str(model), tokenizer=TOKENIZER), load_tokenizer(TOKENIZER))


def test_another_models_tokenizer_is_refused_by_its_end_of_sequence_id(tmp_path):
    model = save_tiny_llama(tmp_path / "other_eos", eos_token_id=7)
    with pytest.raises(ConfigError, match=r"ends sequences with id 2, the model .* with \[7\]"):
        check_vocabulary(ModelSection(path=str(model), tokenizer=TOKENIZER), load_tokenizer(TOKENIZER))
    same = save_tiny_llama(tmp_path / "same")
    check_vocabulary(ModelSection(path=str(same), tokenizer=TOKENIZER), load_tokenizer(TOKENIZER))


@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_take_trust_remote_code(command):
    args, _ = build_parser().parse_known_args([command, "--model", "m", "--adapter", "a", "--data", "d",
                                               "--out", "o", "--trust-remote-code"])
    assert args.trust_remote_code is True
    args, _ = build_parser().parse_known_args([command, "--model", "m", "--adapter", "a", "--data", "d", "--out", "o"])
    assert args.trust_remote_code is False
