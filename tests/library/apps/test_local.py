"""sftpipe run's plumbing around KFP's local runner (the runs themselves: tests/pipelines)."""

from kfp.local import subprocess_task_handler

from sftpipe.apps.cli import build_parser, config_from_args
from sftpipe.apps.local import DEMO_PRESETS, keep_executor_input_intact


def test_parameters_containing_python3_reach_the_step_unchanged():
    keep_executor_input_intact()
    keep_executor_input_intact()  # idempotent: one wrapper, not two
    command = [
        "sh",
        "-ec",
        'python3 -m kfp.dsl.executor_main "$program_path/ephemeral_component.py" "$@"',
        "def step(): ...",
        "--executor_input",
        '{"base_model": "/venv/lib/python3.11/site-packages/model"}',
    ]
    replaced = subprocess_task_handler.replace_python_executable(command, "/venv/bin/python")
    assert replaced[2].startswith("/venv/bin/python -m kfp.dsl.executor_main")
    assert replaced[5] == command[5]


def test_a_demo_preset_is_overridden_by_flags():
    args = build_parser().parse_args(["run", "--demo", "sentiment", "--learning-rate", "0.001"])
    config = config_from_args(args, DEMO_PRESETS[args.demo])
    assert config.registry.model_name == "sftpipe-sentiment"
    assert config.tokenize.max_length == DEMO_PRESETS["sentiment"]["max_length"]
    assert config.train.learning_rate == 0.001
