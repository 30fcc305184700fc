"""The three tokenizers behind one interface, and tools.train_tokenizer."""

import json

import numpy as np
import pytest

from data.tokenizers import HF_EOD_TOKENS, ByteTokenizer, build_tokenizer
from tools import train_tokenizer

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def add(a, b):\n    return a + b\n",
    "Ünïcödé, emoji 🙂 and tabs\tand  double  spaces",
    "Numbers 12345 and symbols <>{}[]!?",
] * 20


def write_jsonl(path, texts):
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def hf_path(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hf")
    corpus = write_jsonl(tmp / "corpus.jsonl", TEXTS)
    out = tmp / "tokenizer.json"
    assert train_tokenizer.main(["--input", corpus, "--output", str(out), "--vocab-size", "300"]) == 0
    return str(out)


def train_sentencepiece(tmp_path, **options) -> str:
    import sentencepiece

    text = tmp_path / "corpus.txt"
    text.write_text("\n".join(t for t in TEXTS if t.isascii()) + "\n", encoding="utf-8")
    prefix = str(tmp_path / "sp")
    sentencepiece.SentencePieceTrainer.train(
        input=str(text), model_prefix=prefix, vocab_size=100, character_coverage=1.0,
        model_type="bpe", minloglevel=2, **options,
    )
    return prefix + ".model"


def test_byte_tokenizer_interface():
    tok = build_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer) and tok.name == "byte"
    ids = tok.encode(TEXTS[2])
    assert ids.dtype == np.int32 and ids.max() < 256
    assert tok.decode(np.append(ids, tok.eod)) == TEXTS[2]
    assert json.loads(json.dumps(tok.unique_identifiers))["vocab_size"] == 258


def test_trained_hf_tokenizer_loads_and_round_trips(hf_path):
    tok = build_tokenizer("hf", hf_path)
    assert tok.name == "hf"
    assert 256 + 2 <= tok.vocab_size <= 300
    vocab = json.load(open(hf_path, encoding="utf-8"))
    specials = {t["content"]: t["id"] for t in vocab["added_tokens"]}
    assert tok.eod == specials["<|endoftext|>"] and tok.pad == specials["<|pad|>"]
    for text in set(TEXTS) | {"unseen: Ωμέγα ☃ 日本語", "", "  leading and trailing  \n"}:
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and (len(ids) == 0 or ids.max() < tok.vocab_size)
        assert tok.decode(ids) == text
    assert len(tok.encode(TEXTS[0])) < len(TEXTS[0].encode())  # merges were learned
    ident = json.loads(json.dumps(tok.unique_identifiers))
    assert ident["class"] == "HFTokenizer" and ident["vocab_size"] == tok.vocab_size


def test_hf_tokenizer_without_eod_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    path = str(tmp_path / "no_eod.json")
    tok.save(path)
    with pytest.raises(ValueError) as err:
        build_tokenizer("hf", path)
    assert path in str(err.value) and all(t in str(err.value) for t in HF_EOD_TOKENS)


def test_train_tokenizer_errors(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    out = tmp_path / "tok.json"
    assert train_tokenizer.main(["--input", str(empty), "--output", str(out), "--vocab-size", "300"]) == 1
    assert "train_tokenizer: error:" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exit_:
        train_tokenizer.main(["--input", str(empty), "--output", str(out), "--vocab-size", "100"])
    assert exit_.value.code == 2


def test_sentencepiece_loads_and_round_trips(tmp_path):
    path = train_sentencepiece(tmp_path)
    tok = build_tokenizer("sentencepiece", path)
    assert tok.name == "sentencepiece" and tok.vocab_size == 100
    assert 0 <= tok.eod < tok.vocab_size
    for text in ("The quick brown fox jumps over the lazy dog.", "return a + b"):
        ids = tok.encode(text)
        assert ids.dtype == np.int32 and ids.max() < tok.vocab_size and tok.eod not in ids
        assert tok.decode(ids) == text
    assert json.loads(json.dumps(tok.unique_identifiers))["class"] == "SentencePieceTokenizer"


def test_sentencepiece_without_eos_is_an_error(tmp_path):
    path = train_sentencepiece(tmp_path, eos_id=-1)
    with pytest.raises(ValueError, match="eos"):
        build_tokenizer("sentencepiece", path)


@pytest.mark.parametrize("kind", ["hf", "sentencepiece"])
def test_build_tokenizer_errors_name_the_config_field(tmp_path, kind):
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        build_tokenizer(kind)
    missing = str(tmp_path / "missing")
    with pytest.raises(ValueError, match="data.tokenizer_path") as err:
        build_tokenizer(kind, missing)
    assert missing in str(err.value)
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x00 not a tokenizer \xff")
    with pytest.raises(ValueError, match="data.tokenizer_path"):
        build_tokenizer(kind, str(garbage))


def test_unknown_tokenizer_kind():
    with pytest.raises(ValueError, match="data.tokenizer='gpt2'"):
        build_tokenizer("gpt2")
