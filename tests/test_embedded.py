import numpy as np

from data.embedded import TEXTS, embedded_prefix, resolve_prefix, stdlib_documents
from data.indexed import open_indexed_dataset
from data.tokenizers import ByteTokenizer


def test_embedded_corpus_is_the_standard_library_byte_tokenized(tmp_path):
    prefix = embedded_prefix("stdlib", str(tmp_path))
    ds = open_indexed_dataset(prefix)
    docs = list(stdlib_documents())
    assert len(ds) == len(docs) > 500
    tok = ByteTokenizer()
    for i in (0, len(docs) // 2, len(docs) - 1):
        ids = ds[i]
        assert ids[-1] == tok.eod
        assert tok.decode(ids[:-1]) == docs[i]["text"]
    assert ds[0].dtype == np.uint16
    mtime = (tmp_path / (prefix.split("/")[-1] + ".idx")).stat().st_mtime
    assert embedded_prefix("stdlib", str(tmp_path)) == prefix  # reused, not rebuilt
    assert (tmp_path / (prefix.split("/")[-1] + ".idx")).stat().st_mtime == mtime


def test_code_tests_and_docs_split_the_library():
    code = {d["path"] for d in TEXTS["code"]()}
    tests = {d["path"] for d in TEXTS["tests"]()}
    assert code and tests and not code & tests
    assert code | tests == {d["path"] for d in stdlib_documents()}
    assert all("/test/" in "/" + p or "/tests/" in "/" + p or p.split("/")[-1].startswith("test_") for p in tests)
    docs = {d["path"]: d["text"] for d in TEXTS["docs"]()}
    assert set(docs) <= code and "json/__init__.py" in docs
    assert "JSON (JavaScript Object Notation)" in docs["json/__init__.py"]


def test_unknown_embedded_corpus_is_an_error():
    import pytest

    from data.indexed import DatasetError

    with pytest.raises(DatasetError, match="unknown embedded corpus; choose one of embedded:stdlib"):
        resolve_prefix("embedded:nope")
    assert resolve_prefix("/data/web") == "/data/web"
