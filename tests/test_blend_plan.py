from tools.blend_plan import main


def write_config(tmp_path, corpus, max_epochs):
    path = tmp_path / "plan.yaml"
    path.write_text(
        "model: {seq_length: 16}\n"
        "train: {iters: 10, global_batch_size: 4, micro_batch_size: 2}\n"
        "scheduler: {warmup_iters: 1}\n"
        "data:\n"
        f"  sources:\n    a: {{prefixes: [{corpus}], max_epochs: {max_epochs}}}\n"
        f"    b: {{prefixes: [{corpus}]}}\n"
        "  phases:\n"
        "    - {name: first, fraction: 0.6, weights: {a: 1, b: 1}}\n"
        "    - {name: second, weights: {b: 1}}\n"
    )
    return str(path)


def test_plan_prints_phases_sources_and_epochs(tmp_path, tiny_corpus, capsys):
    assert main([write_config(tmp_path, tiny_corpus, 5)]) == 0
    out = capsys.readouterr().out
    assert "10 steps x 4 sequences x 16 tokens = 640 training tokens" in out
    rows = [line.split() for line in out.splitlines()[2:]]
    assert ["first", "a", "12", "192", "50.00%", "50.00%"] == rows[0][:6]
    assert ["second", "b", "16", "256", "100.00%", "100.00%"] == rows[3][:6]
    assert ["run", "b", "28", "448", "70.00%"] == rows[5][:5]


def test_plan_fails_on_max_epochs_and_missing_sources(tmp_path, tiny_corpus, capsys):
    assert main([write_config(tmp_path, tiny_corpus, 0.001)]) == 1
    assert "data.sources.a: the schedule reads it" in capsys.readouterr().err
    assert main([write_config(tmp_path, tmp_path / "missing", 1)]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main([write_config(tmp_path, tiny_corpus, 5), "data.phases=[{fraction: 2.0, weights: {a: 1}}]"]) == 1
    assert "fraction=2.0" in capsys.readouterr().err
