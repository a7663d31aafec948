"""The class-conditional DiT family through the pipeline's stages (teacher.family = dit), on a tiny preset."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from tests.conftest import TINY_PARAMS, house_images, latent_workspace, registered_models_in_a_fresh_process, run_stage

# the shared tiny config (240 digits, a 2-epoch feature net, 4 DDIM steps) with a 4-block DiT on its VAE
TINY = {**TINY_PARAMS,
        "teacher": {**TINY_PARAMS["teacher"], "family": "dit", "steps": 20, "checkpoint_every": 10},
        "dit": {"num_layers": 4, "num_heads": 2, "head_dim": 8},
        "autoencoder": {"steps": 10, "batch_size": 32, "block_out_channels": [8, 8]},
        "evaluate": {**TINY_PARAMS["evaluate"], "num_samples": 20, "batch_size": 20}}


_run = run_stage


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return latent_workspace(tmp_path_factory.mktemp("dit-ws"), TINY)


def test_latents_are_encoded_once_with_labels_and_a_safetensors_vae(ws):
    from safetensors.torch import load_file

    p, root, _ = ws
    d = load_file(str(root / "data/latents/latents.safetensors"))
    assert d["latents"].shape[1:] == (4, 4, 4) and len(d["labels"]) == len(d["latents"])
    assert set(d["labels"].tolist()) == set(range(10))  # 180 training digits of every class
    files = {f.name for f in (root / "models/autoencoder").iterdir()}
    assert "diffusion_pytorch_model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    info = json.loads((root / "data/latents/autoencoder.json").read_text())
    assert info["source"] == "trained" and info["scaling_factor"] > 0


def test_the_teacher_records_its_conditioning_and_its_macs_are_counted_per_call(ws):
    from diffprune.metrics.cost import MacCounter
    from diffprune.models.checkpoint import load_model, read_config

    p, root, out = ws
    meta = read_config(root / "models/teacher")["meta"]
    assert meta["family"] == "dit" and meta["conditioning"] == {"num_classes": 10, "guidance_scale": 1.0}
    model = load_model(root / "models/teacher")
    with MacCounter(model) as c:
        model(torch.zeros(1, 4, 4, 4), timestep=torch.tensor([5]), class_labels=torch.tensor([3]))
    assert out["evaluate@teacher"]["metrics"]["trajectory_macs"] == c.total * p.evaluate.steps
    assert (root / "models/teacher-samples.png").exists()


def test_dipgo_on_dit_counted_macs_equal_the_schedule_and_fall(ws):
    from diffprune.pruning.dipgo import Schedule

    _, root, out = ws
    schedule = Schedule.load(root / "models/dipgo/schedule.json")
    m = out["evaluate@dipgo"]["metrics"]
    assert m["macs_ratio_vs_teacher"] == pytest.approx(schedule.macs_ratio, rel=1e-9)
    assert m["macs_ratio_vs_teacher"] < 0.75


def test_an_all_compute_schedule_samples_the_plain_dit_bit_for_bit(ws, tmp_path):
    from diffprune.models.unet import sampling_scheduler
    from diffprune.pruning.dipgo import Schedule
    from diffprune.sampling import sample
    from diffprune.targets import load_target

    p, root, _ = ws
    sched = Schedule.load(root / "models/dipgo/schedule.json")
    full = Schedule(block_names=sched.block_names, keep=[[True] * sched.num_blocks for _ in range(sched.num_steps)])
    full.save(tmp_path / "all.json")
    paths = {"model": root / "models/teacher", "vae": root / "models/autoencoder"}
    plain = load_target("dit", paths)
    gated = load_target("dit-dipgo", {**paths, "schedule": tmp_path / "all.json"})
    s = sampling_scheduler(plain.scheduler_config, "ddim")
    kw = dict(num_images=13, sample_shape=plain.sample_shape, steps=p.evaluate.steps, seed=4, batch_size=5)
    a, b = sample(plain.denoiser, s, **kw), sample(gated.denoiser, s, **kw)
    assert a.shape == (13, 1, 8, 8) and torch.equal(a, b)


def test_diff_pruning_on_dit_drops_params_and_macs(ws):
    _, root, out = ws
    report = json.loads((root / "models/taylor-report.json").read_text())
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert out["evaluate@finetune"]["metrics"]["macs_ratio_vs_teacher"] < 1.0


def test_timestep_experts_on_the_dit_counted_macs_equal_the_router(ws):
    """intervals -> experts -> router -> prune-experts on the labelled latents (every block's heads and
    feed-forward channels elastic, each branch droppable); the mixture's counted MACs are the
    router's."""
    from diffprune.models.checkpoint import read_config
    from diffprune.targets import load_target

    p, root, _ = ws
    for name in ("intervals", "experts", "router", "prune-experts"):
        _run(p, root, name)
    units = read_config(root / "models/experts/elastic/expert-0")["meta"]["space"]["units"]
    assert {u["kind"] for u in units} == {"attention", "mlp"} and all(u["drop_to"] == "zero" for u in units)
    router = json.loads((root / "models/experts/router/router.json").read_text())
    summary = json.loads((root / "models/experts/summary.json").read_text())
    assert summary["macs_per_expert"] == router["macs_per_expert"] and summary["trajectory_macs_ratio"] < 1.0
    assert router["steps_per_expert"][0] > 0 and router["steps_per_expert"][-1] > 0  # both experts serve steps
    m = load_target("dit-experts", {"model": root / "models/experts/mixture", "vae": root / "models/autoencoder"})
    out = _run(p, root, "evaluate@experts")
    rows = 2 if m.denoiser.guided.guided else 1
    traj = sum(mc * n for mc, n in zip(router["macs_per_expert"], router["steps_per_expert"]))
    assert out["metrics"]["trajectory_macs"] == rows * traj and out["metrics"]["macs_ratio_vs_teacher"] < 1.0


def test_the_three_methods_register_and_load_into_dit_pipeline_from_mlflow_in_a_fresh_process(
        ws, monkeypatch, tmp_path):
    """What users do with the results: Diff-Pruning's, DiP-GO's and the experts' registered models, in
    one fresh process, sample the library's images from MLflow, and each as diffusers' DiTPipeline
    (the pruned transformer; the schedule as a ScheduledNetwork; the mixture as TimestepRouted) draws
    the house sampler's images for the same labels and seed (max difference < 1e-5)."""
    p, root, _ = ws
    if not (root / "models/experts/mixture").exists():  # run alone (-k): the expert stages first
        for name in ("intervals", "experts", "router", "prune-experts", "evaluate@experts"):
            _run(p, root, name)
    from diffprune.targets import conditioning

    g = conditioning(root / "models/finetune")["guidance_scale"]
    got = registered_models_in_a_fresh_process(
        p, root, monkeypatch, tmp_path,
        {"class_labels": [0, 1, 2], "num_inference_steps": p.evaluate.steps, "guidance_scale": g})
    assert {n: g["net"] for n, g in got.items()} == {"finetune": "DiTTransformer2DModel",
                                                     "dipgo": "ScheduledNetwork", "experts": "TimestepRouted"}
    for name, one in got.items():
        assert one["loaded"].denoiser.guided.guidance_scale == g
        ours = house_images(one["loaded"], p.evaluate.steps)
        assert one["pipe"].shape == (3, 8, 8, 1) and float(abs(one["pipe"] - ours).max()) < 1e-5, name
    assert not np.array_equal(got["dipgo"]["pipe"], got["finetune"]["pipe"])


def test_a_macs_target_is_met_by_the_ratio_search_on_the_dit(ws, tmp_path):
    """taylor.target_macs_ratio on the DiT: the ratio of heads and MLP channels cut from every block is
    bisected with magnitude probes; the pruned DiT lands within 2% of the target."""
    import dataclasses
    import shutil

    p, root, _ = ws
    shutil.copytree(root, tmp_path / "ws")
    # the tiny DiT's 2 heads per block halve at ratio 0.5 (0.85 at ratio 0.3, 0.56 at 0.51): 0.8 is reached
    # by the MLP channels alone
    _run(dataclasses.replace(p, taylor=dataclasses.replace(p.taylor, target_macs_ratio=0.8)), tmp_path / "ws", "taylor")
    r = json.loads((tmp_path / "ws/models/taylor-report.json").read_text())
    assert r["target_met"] and abs(r["macs_ratio"] - 0.8) <= 0.02 * 0.8 and 0 < r["ratio_found"] < 0.5


def test_a_pixel_family_has_no_latents_stage(tmp_path):
    from diffprune.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="teacher.family = 'unet' is not a latent family"):
        _run(load_params(None), tmp_path, "latents")


def test_init_with_the_dit_preset_writes_a_dit_workspace(tmp_path):
    import yaml

    from diffprune.config import load_params

    bin_ = Path(sys.executable).parent / "diffprune"
    r = subprocess.run([str(bin_), "init", str(tmp_path / "ws"), "--data", "digits", "--preset", "dit-digits"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    p = load_params(tmp_path / "ws/params.yaml")
    assert p.teacher.family == "dit" and p.dit.num_layers == 6 and p.data.source == "digits"
    stages = yaml.safe_load((tmp_path / "ws/dvc.yaml").read_text())["stages"]
    assert "latents" in stages and "experts" in stages and "experts" in stages["evaluate"]["foreach"]
    assert "stack" not in stages and "stack" not in stages["evaluate"]["foreach"]
    assert p.prune_experts.model_name == "diffprune-dit-experts"
    bad = subprocess.run([str(bin_), "init", str(tmp_path / "ws2"), "--data", "digits", "--preset", "../x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--preset '../x'" in bad.stderr and not (tmp_path / "ws2").exists()


def test_a_pretrained_dit_folder_runs_through_the_same_stages_and_samples_as_its_pipeline(tmp_path):
    """teacher.pretrained (facebook/DiT-XL-2-256 online; here a tiny DiTPipeline of the same classes
    saved locally, through the same loading code): the latents stage takes its VAE, the teacher stage
    its transformer and scheduler, and the pipeline model samples DiTPipeline's images."""
    from diffprune.config import load_params
    from diffprune.models.dit import build_dit_pipeline, save_dit
    from diffprune.models.unet import sampling_scheduler
    from diffprune.sampling import sample
    from diffprune.stages.core import target_paths
    from diffprune.targets import load_target
    from tests.rgb_folder import make_rgb_folder

    pipe = build_dit_pipeline(seed=3)
    folder = save_dit(pipe, tmp_path / "tiny-dit")
    images = make_rgb_folder(tmp_path / "shapes", per_class=8, size=16)
    p = load_params(None, {**TINY, "data": {"source": str(images), "channels": 3, "image_size": 16, "max_images": 0,
                                            "ref_fraction": 0.25},
                           "teacher": {**TINY["teacher"], "pretrained": str(folder)}})
    for name in ("data", "latents", "teacher"):
        _run(p, tmp_path / "ws", name)
    assert "tiny-dit" in json.loads((tmp_path / "ws/data/latents/autoencoder.json").read_text())["source"]
    m = load_target("dit", target_paths(tmp_path / "ws", "teacher", "dit"))
    ours = sample(m.denoiser, sampling_scheduler(m.scheduler_config, "ddim"), num_images=3,
                  sample_shape=m.sample_shape, steps=5, seed=2, batch_size=3)
    pipe.scheduler = pipe.scheduler.from_config(sampling_scheduler(m.scheduler_config, "ddim").config)
    img = pipe(class_labels=[0, 1, 2], num_inference_steps=5, guidance_scale=1.0,
               generator=torch.Generator().manual_seed(2), output_type="np").images
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert ours.shape == (3, 16, 16, 3) and float(abs(img - ours).max()) < 1e-5
