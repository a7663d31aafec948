"""Hostile params.yaml inputs (issue 12, items 4-6): refused at load time, before any training, with
an error that names the file or key and never embeds a huge value."""

import subprocess
import sys
import textwrap

import pytest
import torch

from diffprune.config import ConfigError, Params, load_params

from .conftest import REPO

MAX_MESSAGE = 1000  # an error names the key and a value cut to ~200 characters


def _bomb(levels: int = 10) -> str:
    """A "billion laughs" under teacher.block_out_channels: each level is 9 aliases of the one below
    (9**levels leaves once expanded), in a few hundred bytes."""
    value = '&a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]'
    for prev, name in zip("abcdefghijklm", "bcdefghijklm"[: levels - 1]):
        value = f"&{name} [{value},{','.join([f'*{prev}'] * 8)}]"
    return f"teacher:\n  block_out_channels: {value}\n"


def test_yaml_bomb_is_refused_quickly_naming_the_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(_bomb())
    assert f.stat().st_size < 400  # 9**10 = 3.5e9 "lol"s once expanded
    # in a child with 2 GiB of address space and a deadline: expanding the bomb can only fail
    code = textwrap.dedent(f"""
        import resource, sys
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
        from diffprune.config import ConfigError, load_params
        try:
            load_params({str(f)!r})
        except ConfigError as e:
            print(e)
            sys.exit(3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 3, r.stderr[-2000:]
    assert str(f) in r.stdout and "aliases are expanded" in r.stdout and len(r.stdout) < MAX_MESSAGE


def test_yaml_aliases_within_budget_still_load(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("finetune:\n  lr: &lr 0.0005\nprune_experts:\n  lr: *lr\n")
    p = load_params(f)
    assert p.finetune.lr == p.prune_experts.lr == 0.0005


@pytest.mark.parametrize("text, why", [
    ("teacher:\n  attention: &a [true, *a]\n", "recursive"),
    ("teacher:\n  block_out_channels: " + "[" * 5000 + "]" * 5000 + "\n", "refused"),
    ("teacher: !!python/object/apply:os.system ['true']\n", "not valid YAML"),
    ("teacher: [unclosed\n", "not valid YAML"),
])
def test_hostile_yaml_is_a_config_error_naming_the_file(tmp_path, text, why):
    f = tmp_path / "params.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_params(f)
    assert str(f) in str(e.value) and why in str(e.value) and len(str(e.value)) < MAX_MESSAGE


def test_oversized_or_odd_params_files_are_refused(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("data:\n  source: " + "x" * (2 << 20) + "\n")
    with pytest.raises(ConfigError, match="larger than 1048576 bytes") as e:
        load_params(big)
    assert str(big) in str(e.value) and len(str(e.value)) < MAX_MESSAGE
    with pytest.raises(ConfigError, match="not a regular file"):
        load_params(tmp_path)
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"data:\n  source: caf\xe9\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_a_huge_value_is_cut_in_the_error(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text("teacher:\n  lr: " + "9" * 10 + "x" * 500_000 + "\n")
    with pytest.raises(ConfigError) as e:
        load_params(f)
    msg = str(e.value)
    assert msg.startswith("teacher.lr = '9999999999xxx") and "expected a number" in msg and len(msg) < MAX_MESSAGE


# ----------------------------------------------------------------------------- missing file

def test_a_missing_params_file_is_an_error_naming_it(tmp_path):
    missing = tmp_path / "nope" / "params.yaml"
    with pytest.raises(ConfigError, match="params file not found") as e:
        load_params(missing)
    assert str(missing) in str(e.value)
    assert load_params(None) == Params()  # the defaults, asked for explicitly


# ----------------------------------------------------------------------------- bounds

@pytest.mark.parametrize("section, key, value", [
    ("teacher", "steps", 10_000_001),
    ("teacher", "batch_size", 65_537),
    ("teacher", "block_out_channels", [8, 16, 8192]),
    ("teacher", "num_train_timesteps", 100_001),
    ("teacher", "warmup_steps", 10**12),
    ("evaluate", "num_samples", 1_000_001),
    ("evaluate", "batch_size", 10**9),
    ("evaluate", "seeds", list(range(101))),
    ("evaluate", "latency_repeats", 10**6),
    ("data", "image_size", 4096),
    ("dipgo", "steps", 10**7),
    ("dipgo", "pool_size", 10**6),
    ("router", "hidden", 10**5),
    ("intervals", "k", 10**6),
    ("project", "seed", 2**64),
])
def test_values_that_exhaust_memory_or_time_are_refused(section, key, value):
    with pytest.raises(ConfigError) as e:
        load_params(None, {section: {key: value}})
    msg = str(e.value)
    assert f"{section}.{key}" in msg and ("must be <=" in msg or "at most" in msg) and len(msg) < MAX_MESSAGE


# ----------------------------------------------------------------------------- cross-field checks

@pytest.mark.parametrize("override, needle", [
    ({"evaluate": {"steps": 1001}}, "evaluate.steps = 1001: must be <= teacher.num_train_timesteps = 1000"),
    ({"teacher": {"num_train_timesteps": 40}, "evaluate": {"steps": 41}}, "evaluate.steps = 41"),
    ({"intervals": {"grid": 2000}}, "intervals.grid = 2000: must be <= teacher.num_train_timesteps"),
    ({"data": {"image_size": 1024, "channels": 3}}, "GiB (> 8 GiB)"),
    ({"evaluate": {"num_samples": 1_000_000}, "data": {"image_size": 64}}, "evaluate.num_samples = 1000000"),
])
def test_cross_field_checks_at_load_time(override, needle):
    with pytest.raises(ConfigError) as e:
        load_params(None, override)
    assert needle in str(e.value)


def test_memory_estimate_names_every_key_it_used():
    with pytest.raises(ConfigError) as e:
        load_params(None, {"data": {"image_size": 1024, "channels": 3}})
    for key in ("evaluate.batch_size", "evaluate.num_samples", "evaluate.latency_batch", "data.channels",
                "data.image_size"):
        assert key in str(e.value)
    load_params(None, {"data": {"image_size": 32, "channels": 3}})  # CIFAR-sized: fine


@pytest.mark.parametrize("device", ["meta", "garbage", "cuda:99", "cuda:0; rm -rf /", "cpu:0", "", "CUDA"])
def test_devices_this_machine_lacks_are_refused(device):
    with pytest.raises(ConfigError, match="project.device"):
        load_params(None, {"project": {"device": device}})


def test_cuda_and_mps_only_where_they_exist():
    for device, there in (("cuda", torch.cuda.is_available()), ("mps", torch.backends.mps.is_available())):
        if there:
            assert load_params(None, {"project": {"device": device}}).project.device == device
        else:
            with pytest.raises(ConfigError, match=f"project.device = '{device}': not available"):
                load_params(None, {"project": {"device": device}})


# ----------------------------------------------------------------------------- registry names

NAMED = [("register", "model_name"), ("register", "experiment"), ("finetune", "model_name"),
         ("dipgo", "model_name"), ("prune_experts", "model_name")]


@pytest.mark.parametrize("section, key", NAMED)
@pytest.mark.parametrize("name", ["x' OR name LIKE '%", "team/model", "../x", "a:b", "", " x", "-x", ".x",
                                  "x" * 101, "modèle", "a\nb", "x\n"])
def test_model_names_mlflow_would_misread_are_refused(section, key, name):
    with pytest.raises(ConfigError, match=f"{section}.{key} = ") as e:
        load_params(None, {section: {key: name}})
    assert "letters, digits" in str(e.value)


@pytest.mark.parametrize("section, key", NAMED)
def test_plain_model_names_are_fine(section, key):
    assert getattr(load_params(None, {section: {key: "tiny.v2_b-1"}}).section(section), key) == "tiny.v2_b-1"
