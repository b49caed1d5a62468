import pytest

from tokenskip import cli


@pytest.mark.parametrize("cmd", list(cli.COMMANDS))
def test_every_subcommand_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: tokenskip {cmd}")


def test_unknown_command_and_top_help(capsys):
    assert cli.main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in cli.COMMANDS)


def test_bad_config_is_exit_2(tmp_path, capsys):
    bad = tmp_path / "x.yaml"
    bad.write_text("kind: pipeline\nstages: [generate, fly]\n")
    assert cli.main(["pipeline", "--config", str(bad)]) == 2
    assert "fly" in capsys.readouterr().err
