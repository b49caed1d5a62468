import pytest

from ray_jobs import cli


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


def test_pipeline_refuses_a_stage_finished_with_another_config(tmp_path, capsys, ray_local):
    from tokenskip import artifacts
    from tokenskip.config import PipelineConfig, load_config, stage_config

    cfg = tmp_path / "p.yaml"
    cfg.write_text(
        f"kind: pipeline\nrun_dir: {tmp_path / 'run'}\nstages: [generate]\n"
        "generate: {data: {name: gsm8k, limit: 2}, max_new_tokens: 8}\n"
    )
    # a generate stage finished with max_new_tokens 8 (no engine needed: it is only read back)
    gen = stage_config(load_config(PipelineConfig, str(cfg)), "generate")
    artifacts.check_fingerprint(gen.output_dir, gen)
    artifacts.write_manifest(gen.output_dir, "generate", gen, counts={"generated": 2})
    assert cli.main(["pipeline", "--config", str(cfg), "generate.max_new_tokens=9"]) == 2
    err = capsys.readouterr().err
    assert "stage generate:" in err and "max_new_tokens: 8 -> 9" in err and "--force-stage generate" in err
    assert artifacts.read_manifest(gen.output_dir)["counts"] == {"generated": 2}  # nothing lost
