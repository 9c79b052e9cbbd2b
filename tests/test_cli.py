"""Every CLI command: help, one-line errors, and the fast commands for real."""

import json
import subprocess
import sys

import pytest

from dogbreeds import cli, models
from tests.conftest import SAMPLE_DIR


def _run(*argv):
    return subprocess.run(
        [sys.executable, "-m", "dogbreeds.cli", *argv], capture_output=True, text=True, timeout=300
    )


def _commands(parser=None, prefix=()):
    """Every (sub)command of the CLI, found from the parser itself."""
    parser = parser or cli.build_parser()
    found = [prefix]
    for action in parser._subparsers._group_actions if parser._subparsers else []:
        for name, child in action.choices.items():
            found += _commands(child, prefix + (name,))
    return found


@pytest.mark.parametrize("command", _commands(), ids=lambda c: " ".join(c) or "dogbreeds")
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: dogbreeds" in capsys.readouterr().out


def test_bad_options_and_paths_are_one_line_errors():
    for argv, message in [
        (["train", "cnn3v2", "--epochs", "many", "--output", "x"], "invalid int value"),
        (["train", "cnn3v2"], "required: --output"),
        (["data", "--data-dir", "/no/such/folder"], "--data-dir not found"),
        (["train", "resnet9", "--output", "x"], "unknown model 'resnet9'"),
    ]:
        result = _run(*argv)
        lines = [line for line in result.stderr.splitlines() if line.startswith("dogbreeds")]
        assert result.returncode != 0 and "Traceback" not in result.stderr, argv
        assert len(lines) == 1 and message in lines[0], result.stderr


def test_models_lists_the_registry(capsys):
    assert cli.main(["models"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]]
    assert listed == models.list_models()


def test_data_summarises_the_sample(capsys, cache_dir):
    assert cli.main(["data", "--data-dir", str(SAMPLE_DIR), "--json", "--cache-dir", cache_dir]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_classes"] == 120 and summary["num_images"] == 301
    assert summary["skipped"] == []
    assert sum(summary["images_per_class"].values()) == 301


def test_bench_pipeline_prints_and_writes_json(tmp_path, capsys):
    output = tmp_path / "bench.json"
    argv = ["bench", "pipeline", "--data-dir", str(SAMPLE_DIR), "--image-size", "96", "--output", str(output)]
    assert cli.main(argv) == 0
    result = json.loads(output.read_text())
    assert result["num_files"] > 100 and result["skipped"] == 0
    for key in ("bare_pil_loop_images_per_s", "pipeline_decode_images_per_s", "pipeline_cached_load_images_per_s"):
        assert result[key] > 0
    assert '"benchmark": "pipeline"' in capsys.readouterr().out
