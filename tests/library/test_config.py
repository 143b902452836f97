import pytest

from sftpipe.config import FIELDS, SECTIONS, PipelineConfig, TrainConfig, kfp_type
from sftpipe.errors import SftpipeError


def test_every_field_has_help_and_a_kfp_type():
    for name, (_section, info) in FIELDS.items():
        assert info.description, name
        assert kfp_type(info.annotation) in (str, int, float, bool)


def test_flat_round_trip_and_digest():
    config = PipelineConfig.from_flat({"learning_rate": 3e-4, "max_length": 128})
    assert config.train.learning_rate == 3e-4
    assert config.tokenize.max_length == 128
    again = PipelineConfig.from_flat(config.flat())
    assert again == config
    assert again.digest() == config.digest() != PipelineConfig().digest()


def test_unknown_parameter_is_a_one_line_error():
    with pytest.raises(SftpipeError, match=r"unknown parameter\(s\) \['learning_rat'\]"):
        PipelineConfig.from_flat({"learning_rat": 1e-4})


def test_out_of_range_value_names_the_field():
    with pytest.raises(SftpipeError, match="learning_rate=-1.0"):
        TrainConfig.from_values({"learning_rate": -1.0})
    with pytest.raises(SftpipeError, match="precision='fp8'"):
        TrainConfig.from_values({"precision": "fp8"})


def test_sections_cover_every_field_once():
    names = [name for section in SECTIONS.values() for name in section.model_fields]
    assert len(names) == len(set(names)) == len(FIELDS)
