import deltavlm_cli


def test_help_lists_every_command(capsys):
    assert deltavlm_cli.main([]) == 0
    out = capsys.readouterr().out
    for name in deltavlm_cli.COMMANDS:
        assert f"  {name}" in out


def test_unknown_command(capsys):
    assert deltavlm_cli.main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


def test_setup_errors_are_one_line_not_a_traceback(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  lerning_rate: 1.0\n")
    assert deltavlm_cli.main(["train", "--config", str(config)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"deltavlm train: error: {config}: config key training.lerning_rate is not a field of TrainingArguments"]
    assert deltavlm_cli.main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
