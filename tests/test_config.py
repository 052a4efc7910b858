from __future__ import annotations

import pytest

from medmix_core.config import load_config_file, make_config
from medmix_core.errors import MedmixError


def test_unknown_setting_names_field_value_and_allowed():
    with pytest.raises(MedmixError) as err:
        make_config(learning_rate=0.1)
    msg = str(err.value)
    assert "learning_rate = 0.1" in msg and "allowed settings" in msg and "lr" in msg


def test_bad_value_names_the_constraint():
    with pytest.raises(MedmixError, match=r"lr = -1.0: Input should be greater than 0"):
        make_config(lr=-1.0)


def test_seeds_count_expands_and_csv_lists_parse():
    cfg = make_config(seeds=3, experts="stats, grid")
    assert cfg.seeds == [0, 1, 2] and cfg.experts == ["stats", "grid"]


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "c.yaml").write_text("fuser: meanavg\nepochs: 3\n")
    (tmp_path / "c.json").write_text('{"fuser": "max"}')
    assert load_config_file(tmp_path / "c.yaml") == {"fuser": "meanavg", "epochs": 3}
    assert load_config_file(tmp_path / "c.json") == {"fuser": "max"}
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(MedmixError, match="could not be parsed"):
        load_config_file(tmp_path / "bad.json")
    with pytest.raises(MedmixError, match="does not exist"):
        load_config_file(tmp_path / "nope.yaml")


def test_distill_defaults_to_on_when_a_teacher_is_given():
    assert make_config(teacher="mpnet").distill_on
    assert not make_config().distill_on
    assert not make_config(teacher="mpnet", distill=False).distill_on
