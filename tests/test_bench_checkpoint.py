"""tools.bench_checkpoint: a complete table on the CPU, both modes measured on one trainer (no timing asserted)."""

import re

from conftest import tiny_config
from tools import bench_checkpoint


def test_the_table_has_both_modes_and_every_column(tmp_path, tiny_corpus, capsys):
    path = tmp_path / "bench.yaml"
    path.write_text(tiny_config(tmp_path, tiny_corpus).to_yaml())
    assert bench_checkpoint.main([str(path), "--steps", "2", "--saves", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"checkpoint of [\d.]+ MiB on cpu x 1; a step without saves: [\d.]+ ms; 2 saves", out)
    for mode in ("blocking", "background"):
        (row,) = [line for line in out.splitlines() if line.startswith(mode)]
        assert len(re.findall(r"-?[\d.]+ ms", row)) == 4, row
    assert "written in the background" in out


def test_bad_arguments_are_one_line(capsys):
    assert bench_checkpoint.main(["a.yaml", "b.yaml"]) == 2
    assert "expected at most one config file" in capsys.readouterr().err
