"""tools.preprocess_data (JSON Lines to .bin/.idx), data/jsonl.py inputs, tools.inspect_dataset and the benchmark."""

import gzip
import json
import os

import numpy as np
import pytest
import zstandard

from data.indexed import megatron_indexed
from data.tokenizers import ByteTokenizer
from tools import bench_preprocess, inspect_dataset, preprocess_data


def make_lines(n: int = 3000) -> list[str]:
    """Short documents of varied length, with non-ASCII text, an empty one and extra keys."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "γάμμα", "δ", "emoji🙂", "tab\t", "new\nline", "quote\"", ""]
    lines = []
    for i in range(n):
        text = " ".join(rng.choice(words, size=rng.integers(0, 12)))
        lines.append(json.dumps({"id": i, "text": text, "meta": {"n": i}}, ensure_ascii=bool(i % 2)))
    return lines


@pytest.fixture(scope="module")
def lines():
    return make_lines()


def write(path, lines, opener=open):
    with opener(path, "wt", encoding="utf-8") as f:
        f.write("".join(line + "\n" for line in lines))
    return str(path)


def zst_open(path, mode, encoding):
    return zstandard.open(path, mode, encoding=encoding)


def preprocess(input_, prefix, *flags) -> int:
    return preprocess_data.main(["--input", str(input_), "--output-prefix", str(prefix), *flags])


def read_back(prefix) -> list[np.ndarray]:
    """The documents of `prefix`, read with megatron-core's reader; checks one sequence per document."""
    dataset = megatron_indexed().IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))
    return [np.array(dataset[i]) for i in range(len(dataset))]  # copies: the memory map closes with the dataset


def direct(lines, append_eod: bool) -> list[np.ndarray]:
    tok = ByteTokenizer()
    docs = [tok.encode(json.loads(line)["text"]) for line in lines]
    return [np.append(d, tok.eod) if append_eod else d for d in docs]


def same_files(a, b) -> bool:
    return all(open(f"{a}{s}", "rb").read() == open(f"{b}{s}", "rb").read() for s in (".bin", ".idx"))


def outputs(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if not name.endswith((".jsonl", ".gz", ".zst")))


@pytest.mark.parametrize("append_eod", [False, True])
def test_output_equals_direct_tokenization(tmp_path, lines, append_eod, capsys):
    src = write(tmp_path / "in.jsonl", lines)
    assert preprocess(src, tmp_path / "out", *(["--append-eod"] if append_eod else [])) == 0
    got, want = read_back(tmp_path / "out"), direct(lines, append_eod)
    assert len(got) == len(want) == len(lines)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    summary = capsys.readouterr().out
    assert f"documents  {len(lines)}" in summary and f"tokens     {sum(map(len, want))}" in summary
    assert "bad lines  0" in summary and "tokens/s" in summary and "docs/s" in summary


def test_workers_output_is_byte_identical(tmp_path, lines):
    src = write(tmp_path / "in.jsonl", lines)
    assert preprocess(src, tmp_path / "w1", "--append-eod") == 0
    assert preprocess(src, tmp_path / "w2", "--append-eod", "--workers", "2") == 0
    assert same_files(tmp_path / "w1", tmp_path / "w2")


def test_compressed_directory_and_glob_inputs_match_the_plain_file(tmp_path, lines):
    plain = write(tmp_path / "in.jsonl", lines)
    assert preprocess(plain, tmp_path / "plain") == 0
    for name, opener in (("in.jsonl.gz", gzip.open), ("in.jsonl.zst", zst_open)):
        assert preprocess(write(tmp_path / name, lines, opener), tmp_path / name) == 0
        assert same_files(tmp_path / "plain", tmp_path / name)
    # three parts, whose sorted order is the original order: one plain, one .gz, one .zst in a subfolder
    parts = tmp_path / "parts"
    (parts / "z").mkdir(parents=True)
    write(parts / "a.jsonl", lines[:1000])
    write(parts / "b.jsonl.gz", lines[1000:2000], gzip.open)
    write(parts / "z" / "c.jsonl.zst", lines[2000:], zst_open)
    (parts / "notes.txt").write_text("not an input")
    assert preprocess(parts, tmp_path / "dir") == 0
    assert same_files(tmp_path / "plain", tmp_path / "dir")
    assert preprocess(f"{parts}/**/*.jsonl*", tmp_path / "glob") == 0
    assert same_files(tmp_path / "plain", tmp_path / "glob")


BAD = {
    3: "{not json",
    5: "[1, 2, 3]",
    8: json.dumps({"body": "no text key"}),
    9: json.dumps({"text": 42}),
    12: json.dumps({"text": ["a", "list"]}),
    13: '{"text": "lone surrogate \\ud800"}',
}


def with_bad_lines(lines):
    """`lines` with the BAD lines (1-based line numbers) put in, and a blank line, which is skipped."""
    out, good = [], iter(lines)
    for number in range(1, len(lines) + len(BAD) + 1):
        out.append(BAD[number] if number in BAD else next(good))
    out.insert(20, "")
    return out


def test_bad_lines_are_counted_reported_and_good_lines_kept(tmp_path, lines, capsys):
    src = write(tmp_path / "in.jsonl", with_bad_lines(lines[:100]))
    assert preprocess(src, tmp_path / "out", "--append-eod", "--log-bad-lines", "3") == 0
    captured = capsys.readouterr()
    reported = [line for line in captured.err.splitlines() if "bad line" in line]
    assert [line.split(f"{src}:")[1].split(":")[0] for line in reported] == ["3", "5", "8"]
    assert "invalid JSON" in reported[0] and "not a JSON object" in reported[1] and "no key 'text'" in reported[2]
    assert f"bad lines  {len(BAD)} (first 3 shown above)" in captured.out
    for g, w in zip(read_back(tmp_path / "out"), direct(lines[:100], True), strict=True):
        np.testing.assert_array_equal(g, w)


def test_strict_fails_on_the_first_bad_line_and_leaves_nothing(tmp_path, lines, capsys):
    src = write(tmp_path / "in.jsonl", with_bad_lines(lines[:1000]))
    assert preprocess(src, tmp_path / "out", "--strict", "--workers", "2") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("preprocess_data: error:") and f"{src}:3:" in err and "\n" not in err
    assert outputs(tmp_path) == []


@pytest.mark.parametrize("case", ["empty file", "blank lines", "no such file", "folder without inputs", "all bad"])
def test_empty_input_is_an_error_with_no_output(tmp_path, case, capsys):
    src = tmp_path / "in.jsonl"
    if case == "empty file":
        src.write_text("")
    elif case == "blank lines":
        src.write_text("\n  \n\n")
    elif case == "folder without inputs":
        src = tmp_path / "folder"
        src.mkdir()
        (src / "readme.md").write_text("hello")
    elif case == "all bad":
        write(src, list(BAD.values()))
    out = tmp_path / "out"
    out.mkdir()
    assert preprocess(src, out / "data") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("preprocess_data: error: input") and str(src) in err[-1]
    assert os.listdir(out) == []


def test_bad_flags_exit_with_usage_errors(tmp_path):
    for flags in (["--workers", "0"], ["--tokenizer-type", "gpt2"]):
        with pytest.raises(SystemExit) as exit_:
            preprocess(tmp_path / "in.jsonl", tmp_path / "out", *flags)
        assert exit_.value.code == 2
    assert preprocess(tmp_path / "in.jsonl", tmp_path / "out", "--tokenizer-type", "hf") == 1


def test_inspect_dataset_prints_counts_and_documents(tmp_path, capsys):
    texts = ["x" * n for n in range(10)] + ["y" * 999]  # with the eod: 1 to 10 tokens, then 1000
    src = write(tmp_path / "in.jsonl", [json.dumps({"text": t}) for t in texts])
    assert preprocess(src, tmp_path / "ds", "--append-eod") == 0
    capsys.readouterr()
    assert inspect_dataset.main([str(tmp_path / "ds"), "--tokenizer-type", "byte", "--show", "3"]) == 0
    out = capsys.readouterr().out
    assert "documents  11\n" in out and "sequences  11\n" in out and "tokens     1055\n" in out
    assert "dtype      uint16" in out and "min 1  mean 95.9  median 6  p90 10  max 1000" in out
    assert "--- document 1 (2 tokens)\nx\n--- document 2 (3 tokens)\nxx\n" in out and "document 3" not in out


def test_inspect_dataset_fails_cleanly_on_a_missing_or_corrupt_prefix(tmp_path, capsys):
    assert inspect_dataset.main([str(tmp_path / "missing")]) == 1
    assert capsys.readouterr().err.startswith("inspect_dataset: error: dataset prefix")
    src = write(tmp_path / "in.jsonl", [json.dumps({"text": "some text"})] * 10)
    assert preprocess(src, tmp_path / "ds") == 0
    with open(tmp_path / "ds.idx", "r+b") as f:
        f.write(b"NOTMEGA")
    capsys.readouterr()
    assert inspect_dataset.main([str(tmp_path / "ds")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("inspect_dataset: error:") and "magic" in err and "\n" not in err


def test_bench_preprocess_runs_and_checks_identical_outputs(capsys):
    assert bench_preprocess.main(["--workers", "1", "2", "--limit-mb", "0.3"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]
    assert [row[0] for row in rows] == ["1", "2"] and all(row[-1] == "yes" for row in rows)
    assert rows[0][1:3] == rows[1][1:3]
