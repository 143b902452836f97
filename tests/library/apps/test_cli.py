from pathlib import Path

import pytest
import yaml

from sftpipe.apps import cli
from sftpipe.config import FIELDS, PipelineConfig


def parse(*argv):
    return cli.build_parser().parse_args(list(argv))


def test_every_config_field_is_a_flag_with_its_help(capsys):
    with pytest.raises(SystemExit):
        parse("run", "--help")
    text = capsys.readouterr().out
    for name, (_section, info) in FIELDS.items():
        assert "--" + name.replace("_", "-") in text
        assert " ".join(info.description.split())[:30] in " ".join(text.split())


def test_flags_override_file_which_overrides_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump({"train": {"learning_rate": 0.01, "max_steps": 7}, "max_length": 99})
    )
    args = parse(
        "run", "--config", str(path), "--max-steps", "3", "--no-dedupe", "--precision", "fp32"
    )
    config = cli.config_from_args(args)
    assert (config.train.learning_rate, config.train.max_steps) == (0.01, 3)
    assert config.tokenize.max_length == 99 and config.data.dedupe is False
    assert config.train.precision == "fp32"
    assert config.evaluate == PipelineConfig().evaluate


def test_bad_values_are_one_line_errors(tmp_path, capsys):
    path = tmp_path / "params.yaml"
    path.write_text("learning_rat: 1\n")
    assert cli.main(["run", "--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (
        "sftpipe: error: config: unknown parameter(s) ['learning_rat'] (see `sftpipe run --help`)"
    )
    assert cli.main(["run", "--learning-rate", "-1"]) == 2
    assert "learning_rate=-1.0: Input should be greater than 0" in capsys.readouterr().err


def test_compile_writes_the_pipeline(tmp_path):
    out = tmp_path / "p.yaml"
    assert cli.main(["compile", "--output", str(out), "--no-gpu"]) == 0
    spec, _platform = yaml.safe_load_all(out.read_text())  # pipeline spec, kubernetes settings
    assert spec["pipelineInfo"]["name"] == "sftpipe-sft"
    assert "accelerator" not in str(spec["deploymentSpec"])


def test_submit_to_an_unreachable_endpoint_is_a_clear_error(capsys):
    # Compiles the package first (no --package), then cannot reach the API: one line.
    code = cli.main(["submit", "--host", "http://127.0.0.1:9", "--data-uri", "s3://b/k.jsonl"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("sftpipe: error: http://127.0.0.1:9: cannot reach the KFP API")
    assert len(err.strip().splitlines()) == 1


def test_compile_flags_set_the_cluster_options(tmp_path):
    out = tmp_path / "p.yaml"
    args = [
        "compile",
        "-o",
        str(out),
        "--gpu-count",
        "2",
        "--node-selector",
        "pool=gpu",
        "--toleration",
        "dedicated=ml:NoSchedule",
        "--memory-request",
        "finetune=40G",
        "--s3-secret",
        "my-s3",
    ]
    assert cli.main(args) == 0
    spec, platform = yaml.safe_load_all(out.read_text())
    resources = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]["resources"]
    assert resources["accelerator"]["resourceCount"] == "2"
    assert resources["resourceMemoryRequest"] == "40G" and resources["resourceCpuRequest"] == "4"
    finetune = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-finetune"]
    assert finetune["nodeSelector"] == {"labels": {"pool": "gpu"}}
    assert finetune["tolerations"] == [
        {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    ]
    assert "my-s3" in {s["secretName"] for s in finetune["secretAsEnv"]}


def test_bad_compile_flags_are_one_line_errors(tmp_path, capsys):
    out = str(tmp_path / "p.yaml")
    assert cli.main(["compile", "-o", out, "--node-selector", "pool"]) == 2
    assert "--node-selector: 'pool' is not KEY=VALUE" in capsys.readouterr().err
    assert cli.main(["compile", "-o", out, "--memory-request", "train=1G"]) == 2
    assert "unknown step(s) ['train']" in capsys.readouterr().err
    assert cli.main(["compile", "-o", out, "--toleration", "k:Never"]) == 2
    assert "expected KEY[=VALUE][:EFFECT]" in capsys.readouterr().err


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_an_unwritable_output_is_one_line_with_the_traceback_in_a_file(
    tmp_path, capsys, monkeypatch
):
    """/sys refuses new files to every user, root included: a read-only output folder."""
    monkeypatch.chdir(tmp_path)
    output = Path("/sys/sftpipe-test/p.yaml")
    assert cli.main(["compile", "-o", str(output)]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    (saved,) = (tmp_path / ".sftpipe" / "logs").glob("compile-*.log")
    assert err.strip() == (
        f"sftpipe: error: compile: {output.parent}: Operation not permitted (PermissionError, "
        f"errno 1) (check the permissions of that path) (traceback: {saved.relative_to(tmp_path)})"
    )
    assert saved.read_text(encoding="utf-8").startswith("Traceback (most recent call last)")


def test_ctrl_c_ends_with_one_line(tmp_path, capsys, monkeypatch):
    """A real SIGINT to this process while a command works: no traceback, exit status 130."""
    import os
    import signal

    def interrupted(args, output):
        os.kill(os.getpid(), signal.SIGINT)
        raise AssertionError("SIGINT did not interrupt")

    monkeypatch.setattr(cli, "compile_package", interrupted)
    assert cli.main(["compile", "-o", str(tmp_path / "p.yaml")]) == 130
    assert capsys.readouterr().err.strip() == "sftpipe: interrupted"
