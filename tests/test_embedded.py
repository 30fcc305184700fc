import numpy as np

from data.embedded import embedded_corpus, stdlib_documents
from data.indexed import open_indexed_dataset
from data.tokenizers import ByteTokenizer


def test_embedded_corpus_is_the_standard_library_byte_tokenized(tmp_path):
    prefix = embedded_corpus(str(tmp_path))
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
    assert embedded_corpus(str(tmp_path)) == prefix  # reused, not rebuilt
    assert (tmp_path / (prefix.split("/")[-1] + ".idx")).stat().st_mtime == mtime
