"""The components are thin: their inputs are config fields (plus the run id), they declare no
defaults of their own, and together they consume every field."""

import inspect

import pytest
from sftpipe.components.clean import clean
from sftpipe.components.clean.fan_out import clean_merge, clean_plan, clean_shard
from sftpipe.components.evaluate import evaluate
from sftpipe.components.finetune import finetune
from sftpipe.components.register import register
from sftpipe.components.tokenize import tokenize

from sftpipe.config import FIELDS, kfp_type
from sftpipe.kfp_glue.steps import RUNTIME_INPUTS, STEPS

COMPONENTS = {
    "clean": clean,
    "clean_plan": clean_plan,
    "clean_shard": clean_shard,
    "clean_merge": clean_merge,
    "tokenize": tokenize,
    "finetune": finetune,
    "evaluate": evaluate,
    "register": register,
}
KFP_TYPES = {str: "String", int: "Integer", float: "Float", bool: "Boolean"}


def parameters(component):
    """The component's non-artifact inputs."""
    return {
        name: spec
        for name, spec in component.component_spec.inputs.items()
        if not spec.type.startswith("system.")
    }


@pytest.mark.parametrize("name", COMPONENTS)
def test_inputs_are_config_fields_without_defaults(name):
    component = COMPONENTS[name]
    for param, spec in parameters(component).items():
        assert param in FIELDS or param in RUNTIME_INPUTS, f"{name}.{param} is not a config field"
        assert not spec.optional and spec.default is None, f"{name}.{param} has its own default"
        if param in FIELDS:
            assert spec.type == KFP_TYPES[kfp_type(FIELDS[param][1].annotation)], (name, param)


def test_every_field_reaches_a_component():
    consumed = set().union(*(parameters(c) for c in COMPONENTS.values()))
    assert set(FIELDS) <= consumed


@pytest.mark.parametrize("name", COMPONENTS)
def test_component_is_a_thin_call_into_its_step(name):
    source = inspect.getsource(COMPONENTS[name].python_func)
    body = source.split('"""')[-1]
    assert f'run_step("{name}", **inputs)' in body
    assert body.count("\n    ") <= 4  # capture inputs, import, call: nothing else
    assert name in STEPS
