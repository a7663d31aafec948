import dataclasses
import json

import pytest
import yaml

from diffprune.config import (SECTIONS, ConfigError, DataConfig, Params, TeacherConfig, fingerprint, load_params,
                              resolve_device, to_dict, write_schema)

from .conftest import REPO


def test_repo_params_load_and_are_frozen():
    p = load_params(REPO / "params.yaml")
    assert isinstance(p, Params)
    assert len(p.teacher.block_out_channels) >= 3  # >= 3 resolution levels for later methods
    with pytest.raises(Exception):
        p.teacher.lr = 1.0  # frozen


@pytest.mark.parametrize(
    "override, key, value",
    [
        ({"teacher": {"lr": "abc"}}, "teacher.lr", "'abc'"),
        ({"teacher": {"steps": -3}}, "teacher.steps", "-3"),
        ({"teacher": {"steps": 2.5}}, "teacher.steps", "2.5"),
        ({"taylor": {"ratio": 1.5}}, "taylor.ratio", "1.5"),
        ({"taylor": {"importance": "bogus"}}, "taylor.importance", "'bogus'"),
        ({"data": {"source": ""}}, "data.source", "''"),
        ({"evaluate": {"seeds": []}}, "evaluate.seeds", "[]"),
        ({"teacher": {"attention": [True]}}, "teacher.attention", "[True]"),
        ({"teacher": {"nope": 1}}, "teacher.nope", "unknown key"),
        ({"project": {"seed": True}}, "project.seed", "True"),
    ],
)
def test_bad_values_name_key_and_value(tmp_path, override, key, value):
    with pytest.raises(ConfigError) as e:
        load_params(None, override)  # None: the defaults (a missing file is now an error)
    assert key in str(e.value) and value in str(e.value)


def test_malformed_yaml_is_a_config_error(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("teacher: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(f)


def test_cuda_on_a_machine_without_one():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="project.device = 'cuda'"):
        resolve_device("cuda")


# ----------------------------------------------------------------------------- one source of defaults

def test_repo_params_equal_the_defaults():
    """params.yaml is what the demo runs; the models' defaults are the same values."""
    assert load_params(REPO / "params.yaml") == Params()


def test_every_option_is_written_in_params_yaml():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert set(raw) == set(SECTIONS)
    for name in SECTIONS:
        fields = {f.name for f in dataclasses.fields(Params().section(name))}
        assert set(raw[name]) == fields, name


def test_params_yaml_points_editors_at_the_schema():
    assert (REPO / "params.yaml").read_text().startswith("# yaml-language-server: $schema=params.schema.json\n")


def test_committed_schema_is_up_to_date(tmp_path):
    """Regenerate with: python -c 'from diffprune.config import write_schema; write_schema()'."""
    fresh = write_schema(tmp_path / "params.schema.json").read_text()
    assert (REPO / "params.schema.json").read_text() == fresh
    schema = json.loads(fresh)
    assert schema["additionalProperties"] is False and set(schema["properties"]) == set(SECTIONS)
    assert schema["$defs"]["TeacherConfig"]["properties"]["steps"]["maximum"] == 10_000_000


# ----------------------------------------------------------------------------- call patterns of stage code

def test_dataclass_patterns_keep_working_and_validate():
    p = Params()
    assert dataclasses.is_dataclass(p) and hasattr(p.teacher, "__dataclass_fields__")
    assert dataclasses.replace(p.router, budget=0.3).budget == 0.3
    assert dataclasses.replace(p, router=dataclasses.replace(p.router, budget=0.3)).router.budget == 0.3
    with pytest.raises(ConfigError, match=r"router.budget = 2.0: must be <= 1.0"):
        dataclasses.replace(p.router, budget=2.0)
    with pytest.raises(ConfigError, match="teacher.lr = 'abc': expected a number"):
        TeacherConfig(lr="abc")
    assert to_dict(p)["teacher"] == dataclasses.asdict(p.teacher) and to_dict(p.teacher)["steps"] == 1000
    assert p.section("teacher") is p.teacher
    with pytest.raises(ConfigError, match="unknown params section 'section'"):
        p.section("section")


def test_strict_types_ints_are_numbers_but_bools_are_not():
    assert TeacherConfig(lr=1).lr == 1.0 and isinstance(TeacherConfig(lr=1).lr, float)
    for bad in ({"channels": True}, {"channels": 2}, {"image_size": "8"}, {"ref_fraction": float("nan")}):
        with pytest.raises(ConfigError, match="data." + next(iter(bad))):
            DataConfig(**bad)


def test_fingerprint_is_stable_and_ignores_key_order():
    assert fingerprint(Params()) == fingerprint(load_params(REPO / "params.yaml")) == fingerprint(Params())
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint(Params()) != fingerprint(load_params(None, {"teacher": {"lr": 0.001}}))


def test_empty_section_means_its_defaults(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("teacher:\nrouter:\n  steps: 7\n")
    p = load_params(f)
    assert p.teacher == Params().teacher and p.router.steps == 7 and p.router.lr == Params().router.lr
