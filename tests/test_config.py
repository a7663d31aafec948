import pytest

from diffprune.config import ConfigError, Params, load_params, resolve_device

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
        load_params(tmp_path / "missing.yaml", override)
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
