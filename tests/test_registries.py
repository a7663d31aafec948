"""Explicit registries: every kind of saved model loads in a fresh process that imports only the loader.

Each model is saved, then a new Python process imports nothing but ``diffprune.models.checkpoint``
and ``diffprune.targets`` (so no method package registers anything first), loads it, runs it on
inputs written as safetensors and writes its outputs back; they must equal the originals bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffprune.config import TaylorConfig
from diffprune.models.blocks import ShortcutBlock, SkippedBlock
from diffprune.models.checkpoint import save_model
from diffprune.pruning.dipgo import Schedule, SkipScheduleDenoiser, deepcache_schedule
from diffprune.pruning.dipgo.graph import block_graph
from diffprune.pruning.experts import ExpertMixtureModel, elastic_space, prune_to_config, save_mixture
from diffprune.pruning.taylor import prune_unet
from diffprune.sampling import ModelDenoiser
from diffprune.stages import core, dipgo, experts, stack, taylor

from .conftest import REPO

SHAPE = (1, 8, 8)
STEPS = 4  # denoiser calls per target, t falling as in sampling
SCHED = {"num_train_timesteps": 1000}

# Runs in the fresh process: argv = folder with inputs.safetensors and models.json.
_LOADER = """
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file
from diffprune.models.checkpoint import load_model
from diffprune.targets import load_target

assert "diffprune.pruning.experts" not in sys.modules and "diffprune.stages" not in sys.modules, sorted(sys.modules)
root = Path(sys.argv[1])
inp = load_file(str(root / "inputs.safetensors"))
out = {}
with torch.no_grad():
    for name, spec in json.loads((root / "models.json").read_text()).items():
        if "checkpoint" in spec:
            model = load_model(root / spec["checkpoint"])
            nets = list(model.experts) if hasattr(model, "experts") else [model]
            for k, net in enumerate(nets):
                out[f"{name}/net{k}"] = net(inp["x"], inp["t0"]).sample
        else:
            den = load_target(spec["kind"], {k: root / v for k, v in spec["paths"].items()}).denoiser
            for step in range(inp["ts"].shape[0]):
                out[f"{name}/step{step}"] = den(inp["x"], inp["ts"][step], step)
save_file({k: v.contiguous() for k, v in out.items()}, str(root / "outputs.safetensors"))
"""


def _expected(models: dict, inp: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    with torch.no_grad():
        for name, (spec, obj) in models.items():
            if "checkpoint" in spec:
                nets = list(obj.experts) if hasattr(obj, "experts") else [obj]
                for k, net in enumerate(nets):
                    out[f"{name}/net{k}"] = net(inp["x"], inp["t0"]).sample
            else:
                for step in range(inp["ts"].shape[0]):
                    out[f"{name}/step{step}"] = obj(inp["x"], inp["ts"][step], step)
    return out


@pytest.fixture
def saved(tmp_path: Path, tiny_unet, tiny_scheduler) -> tuple[Path, dict]:
    """Every kind of saved model and target, with the in-process object each must reproduce."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(16, *SHAPE, generator=g) * 2 - 1
    pruned, _ = prune_unet(tiny_unet, tiny_scheduler, images, TaylorConfig(importance="magnitude", ratio=0.5))
    space = elastic_space(tiny_unet, SHAPE, min_width=0.5)
    expert = prune_to_config(tiny_unet, space, space.smallest(), SHAPE)
    assert any(isinstance(m, ShortcutBlock) for m in expert.modules())
    assert any(isinstance(m, SkippedBlock) for m in expert.modules())
    mixture = ExpertMixtureModel([expert, tiny_unet], [500])
    schedule = deepcache_schedule(tiny_unet, STEPS, interval=2, branch=1, sample_shape=SHAPE)
    # a stacked model: a mixture of one width under a skip schedule, with its own step count
    twin = ExpertMixtureModel([pruned, prune_unet(tiny_unet, tiny_scheduler, images, TaylorConfig(
        importance="magnitude", ratio=0.5, seed=1))[0]], [500])
    stacked = Schedule(keep=[[True] * 7, [True, False, True, True, True, False, True], [True] * 7, [False] * 7],
                       block_names=block_graph(twin).block_names)

    save_model(tiny_unet, tmp_path / "unet", scheduler_config=SCHED)
    save_model(pruned, tmp_path / "pruned", scheduler_config=SCHED)
    save_model(expert, tmp_path / "expert", scheduler_config=SCHED)
    save_mixture(mixture, tmp_path / "mixture", scheduler_config=SCHED)
    schedule.save(tmp_path / "schedule.json")
    save_model(twin, tmp_path / "stack" / "model", scheduler_config=SCHED)
    (tmp_path / "stack" / "stack.json").write_text(json.dumps({"chosen": {"steps": STEPS},
                                                               "schedule": stacked.to_json()}))
    models = {
        "unet": ({"checkpoint": "unet"}, tiny_unet),
        "diff-pruned": ({"checkpoint": "pruned"}, pruned),
        "expert": ({"checkpoint": "expert"}, expert),
        "mixture": ({"checkpoint": "mixture"}, mixture),
        "target-unet": ({"kind": "unet", "paths": {"model": "pruned"}}, ModelDenoiser(pruned)),
        "target-dipgo": ({"kind": "dipgo", "paths": {"model": "unet", "schedule": "schedule.json"}},
                         SkipScheduleDenoiser(tiny_unet, schedule)),
        "target-experts": ({"kind": "experts", "paths": {"model": "mixture"}}, mixture.denoiser()),
        "target-stack": ({"kind": "stack", "paths": {"model": "stack/model", "stack": "stack/stack.json"}},
                         SkipScheduleDenoiser(twin, stacked)),
    }
    (tmp_path / "models.json").write_text(json.dumps({k: spec for k, (spec, _) in models.items()}))
    return tmp_path, models


def test_every_saved_model_loads_in_a_fresh_process_with_identical_outputs(saved):
    root, models = saved
    g = torch.Generator().manual_seed(1)
    inp = {"x": torch.randn(2, *SHAPE, generator=g), "t0": torch.tensor([3, 900]),
           "ts": torch.tensor([[900, 900], [600, 600], [300, 300], [10, 10]])}  # one t per step, both images
    save_file(inp, str(root / "inputs.safetensors"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-c", _LOADER, str(root)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = load_file(str(root / "outputs.safetensors"))
    want = _expected(models, inp)
    assert sorted(got) == sorted(want)
    assert {k.split("/")[0] for k in got} == set(models)
    for key, value in want.items():
        assert torch.equal(got[key], value), key
    assert not torch.equal(want["expert/net0"], want["unet/net0"])  # the pruned nets are really different


def test_targets_are_declared_in_one_table_with_the_stage_outputs():
    assert set(core.TARGETS) == {"teacher", "finetune", "dipgo", "experts", "stack"}
    assert core.TARGETS["stack"].paths == {"model": f"{stack.STACK}/model", "stack": f"{stack.STACK}/stack.json"}
    assert core.TARGETS["finetune"].paths == {"model": taylor.FINETUNED}
    assert core.TARGETS["dipgo"].paths == {"model": core.TEACHER, "schedule": f"{dipgo.SCHEDULE_DIR}/schedule.json"}
    assert core.TARGETS["experts"].paths == {"model": experts.MIXTURE}
    from diffprune.targets import KINDS

    assert {t.kind for t in core.TARGETS.values()} <= set(KINDS)


def test_unknown_model_class_is_refused_at_save_naming_it(tmp_path):
    from diffprune.io import ArtifactError

    class Custom(torch.nn.Linear):
        config: dict = {}

    with pytest.raises(ArtifactError, match="'Custom'"):
        save_model(Custom(2, 2), tmp_path / "c")
    assert not (tmp_path / "c").exists()
