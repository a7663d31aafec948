"""The text-to-image latent UNet family through the pipeline's stages (teacher.family = sd), on a tiny
preset: captioned digits, a tiny VAE fitted here, a tiny CLIP text encoder initialised here."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

from tests.conftest import TINY_PARAMS, house_images, latent_workspace, registered_models_in_a_fresh_process, run_stage

# the shared tiny config (240 digits, a 2-epoch feature net, 4 DDIM steps) with a 2-level UNet2DConditionModel
TINY = {**TINY_PARAMS,
        "teacher": {**TINY_PARAMS["teacher"], "family": "sd", "steps": 20, "checkpoint_every": 10},
        "sd": {"block_out_channels": [8, 16], "attention_head_dim": 2, "norm_num_groups": 4, "text_width": 16,
               "text_layers": 1, "text_heads": 2, "caption_dropout": 0.5},
        "autoencoder": {"steps": 10, "batch_size": 32, "block_out_channels": [8, 8]},
        "evaluate": {**TINY_PARAMS["evaluate"], "num_samples": 20, "batch_size": 20}}


_run = run_stage


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return latent_workspace(tmp_path_factory.mktemp("sd-ws"), TINY)


def test_the_latents_stage_writes_a_frozen_safetensors_text_encoder(ws):
    p, root, out = ws
    files = {f.relative_to(root / "models/text-encoder").as_posix() for f in (root / "models/text-encoder").rglob("*")}
    assert "text_encoder/model.safetensors" in files and {"tokenizer/vocab.json", "tokenizer/tokenizer.json"} & files
    assert not any(f.endswith((".bin", ".pt", ".pkl")) for f in files)
    assert out["latents"]["text_encoder_source"] == "initialised"
    meta = json.loads((root / "models/teacher/config.json").read_text())["meta"]
    assert meta["family"] == "sd" and meta["conditioning"]["captions"][7] == "a handwritten 7"
    assert len(meta["conditioning"]["captions"]) == 10 and (root / "models/teacher-samples.png").exists()


def test_the_teacher_is_prompted_its_captions_change_the_prediction_and_drop_out_in_training(ws):
    from diffprune.models.checkpoint import load_model
    from diffprune.models.sd import CaptionCall
    from diffprune.stages.sd import caption_table

    p, root, _ = ws
    table = caption_table(root, [f"a handwritten {k}" for k in range(10)])
    model = load_model(root / "models/teacher")
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    call = CaptionCall(table, dropout=1.0)
    with torch.no_grad():
        a, b = call(model, x, t, torch.tensor([3, 3])), call(model, x, t, torch.tensor([3, 8]))
        assert torch.equal(a[0], b[0]) and not torch.allclose(a[1], b[1])  # row 1's caption moved it
        model.train()
        dropped = call(model, x, t, torch.tensor([3, 8]))
        model.eval()
        empty = model(x, t, encoder_hidden_states=table.negative.expand(2, -1, -1)).sample
    assert torch.allclose(dropped, empty, atol=1e-6)  # dropout 1: every caption is the empty prompt


def test_the_evaluation_says_the_clip_score_is_not_measured_without_clip_weights(ws):
    m = ws[2]["evaluate@teacher"]["metrics"]
    assert m["clip_score"] is None and "clip.weights" in m["clip_label"]


def test_the_clip_score_of_the_samples_is_measured_against_their_captions(ws, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffprune.metrics.clip import clip_score
    from diffprune.models.sd import tiny_tokenizer
    from diffprune.targets import load_target

    p, root, _ = ws
    tok = tiny_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=24, bos_token_id=tok.bos_token_id,
                                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=8, patch_size=4), projection_dim=8)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(tmp_path / "clip")
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8}),
                  tokenizer=tok).save_pretrained(tmp_path / "clip")
    with_clip = dataclasses.replace(p, clip=dataclasses.replace(p.clip, weights=str(tmp_path / "clip")))
    m = _run(with_clip, root, "evaluate", target="finetune")
    got = m["metrics"]
    den = load_target("sd", {"model": root / "models/finetune", "vae": root / "models/autoencoder",
                             "text": root / "models/text-encoder"}).denoiser
    from safetensors.torch import load_file

    samples = load_file(str(root / "models/eval/finetune/samples.safetensors"))["samples"]
    want = clip_score(samples, den.prompts(len(samples)), tmp_path / "clip")
    assert den.prompts(12)[11] == "a handwritten 1" and got["clip_score"] == want.score is not None
    assert str(tmp_path / "clip") in got["clip_label"]


def test_dipgo_on_sd_counted_macs_equal_the_schedule_and_fall(ws):
    from diffprune.pruning.dipgo import Schedule

    _, root, out = ws
    schedule = Schedule.load(root / "models/dipgo/schedule.json")
    m = out["evaluate@dipgo"]["metrics"]
    assert m["macs_ratio_vs_teacher"] == pytest.approx(schedule.macs_ratio, rel=1e-9)
    assert m["macs_ratio_vs_teacher"] < 1.0


def test_an_all_compute_schedule_samples_the_plain_unet_bit_for_bit(ws, tmp_path):
    from diffprune.models.unet import sampling_scheduler
    from diffprune.pruning.dipgo import Schedule
    from diffprune.sampling import sample
    from diffprune.targets import load_target

    p, root, _ = ws
    sched = Schedule.load(root / "models/dipgo/schedule.json")
    full = Schedule(block_names=sched.block_names, keep=[[True] * sched.num_blocks for _ in range(sched.num_steps)])
    full.save(tmp_path / "all.json")
    paths = {"model": root / "models/teacher", "vae": root / "models/autoencoder", "text": root / "models/text-encoder"}
    plain = load_target("sd", paths)
    gated = load_target("sd-dipgo", {**paths, "schedule": tmp_path / "all.json"})
    s = sampling_scheduler(plain.scheduler_config, "ddim")
    kw = dict(num_images=13, sample_shape=plain.sample_shape, steps=p.evaluate.steps, seed=4, batch_size=5)
    a, b = sample(plain.denoiser, s, **kw), sample(gated.denoiser, s, **kw)
    assert a.shape == (13, 1, 8, 8) and torch.equal(a, b)


def test_diff_pruning_on_sd_drops_params_and_macs_and_leaves_the_text_encoder(ws):
    _, root, out = ws
    report = json.loads((root / "models/taylor-report.json").read_text())
    assert report["params_after"] < report["params_before"] and report["macs_after"] < report["macs_before"]
    assert out["evaluate@finetune"]["metrics"]["macs_ratio_vs_teacher"] < 1.0
    assert set(report["heads"].values()) <= {1, 2}


def test_the_expert_stages_refuse_the_sd_family_by_name(ws):
    from diffprune.config import ConfigError

    p, root, _ = ws
    with pytest.raises(ConfigError, match="stage stack: not available for teacher.family = 'sd'"):
        _run(p, root, "stack")


def test_captions_one_per_class_are_refused_for_another_class_count_or_when_empty(tmp_path):
    from diffprune.config import ConfigError, load_params
    from diffprune.stages.sd import _captions

    p = load_params(None, {"sd": {"captions": ["zero", "one"]}})
    assert _captions(p, tmp_path, 2) == ["zero", "one"]
    with pytest.raises(ConfigError, match="sd.captions has 2 prompts, the dataset 3 classes"):
        _captions(p, tmp_path, 3)
    with pytest.raises(ConfigError, match="sd.captions"):
        load_params(None, {"sd": {"captions": ["zero", ""]}})


def test_a_caption_without_its_label_is_refused_by_name():
    from diffprune.config import ConfigError, load_params

    with pytest.raises(ConfigError, match="sd.caption = 'a digit'"):
        load_params(None, {"sd": {"caption": "a digit"}})


def test_init_with_the_sd_preset_writes_an_sd_workspace(tmp_path):
    import yaml

    from diffprune.config import load_params

    bin_ = Path(sys.executable).parent / "diffprune"
    r = subprocess.run([str(bin_), "init", str(tmp_path / "ws"), "--data", "digits", "--preset", "sd-digits"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    p = load_params(tmp_path / "ws/params.yaml")
    assert p.teacher.family == "sd" and p.sd.block_out_channels == [32, 64]
    stages = yaml.safe_load((tmp_path / "ws/dvc.yaml").read_text())["stages"]
    assert "models/text-encoder" in stages["latents"]["outs"] and "stack" not in stages
    assert "models/text-encoder" in stages["finetune"]["deps"]



def test_a_macs_target_is_met_by_the_ratio_search_on_the_captioned_model(ws, tmp_path):
    """taylor.target_macs_ratio on the text-to-image UNet: the channel ratio is bisected on the teacher
    with its captions bound, and the pruned model lands within 2% of the target."""
    import shutil

    p, root, _ = ws
    shutil.copytree(root, tmp_path / "ws")
    # the tiny UNet's MACs move in coarse steps (magnitude probes: 0.73, 0.71, 0.68, then 0.28); with
    # Diff-Pruning's scores its heads go elsewhere than the probe's, so the MACs land near the probe's,
    # and target_met is the pruned model's own
    p = dataclasses.replace(p, taylor=dataclasses.replace(p.taylor, target_macs_ratio=0.7))
    _run(p, tmp_path / "ws", "taylor")
    r = json.loads((tmp_path / "ws/models/taylor-report.json").read_text())
    assert abs(r["probe_macs_ratio"] - 0.7) <= 0.02 * 0.7 and 0 < r["ratio_found"] < 1
    assert abs(r["macs_ratio"] - 0.7) <= 0.05 * 0.7 and r["target_met"] == (abs(r["macs_ratio"] - 0.7) <= 0.02 * 0.7)


def test_a_pretrained_stable_diffusion_folder_runs_through_the_same_stages_and_samples_as_its_pipeline(tmp_path):
    """teacher.pretrained (a Hub id online; here a tiny StableDiffusionPipeline of the same classes
    saved locally, through the same loading code): the latents stage takes its VAE and text encoder,
    the teacher stage its UNet and scheduler, and the pipeline model samples the pipeline's images."""
    from diffprune.config import load_params
    from diffprune.models.sd import build_sd_pipeline, save_sd
    from diffprune.models.unet import sampling_scheduler
    from diffprune.sampling import sample
    from diffprune.stages.core import target_paths
    from diffprune.targets import load_target
    from tests.rgb_folder import make_rgb_folder

    pipe = build_sd_pipeline(seed=3)
    folder = save_sd(pipe, tmp_path / "tiny-sd")
    images = make_rgb_folder(tmp_path / "shapes", per_class=8, size=16)
    p = load_params(None, {**TINY, "data": {"source": str(images), "channels": 3, "image_size": 16, "max_images": 0,
                                            "ref_fraction": 0.25},
                           "teacher": {**TINY["teacher"], "pretrained": str(folder)},
                           "sd": {**TINY["sd"], "captions": ["shape one", "shape two", "shape three"]}})
    for name in ("data", "latents", "teacher"):
        out = _run(p, tmp_path / "ws", name)
    assert "tiny-sd" in json.loads((tmp_path / "ws/data/latents/autoencoder.json").read_text())["source"]
    m = load_target("sd", target_paths(tmp_path / "ws", "teacher", "sd"))
    assert torch.equal(m.modules[0].conv_in.weight, pipe.unet.conv_in.weight) and out["teacher"]
    captions = m.denoiser.prompts(3)  # the shapes' 3 classes, prompted by sd.captions (one per class)
    assert captions == ["shape one", "shape two", "shape three"]
    ours = sample(m.denoiser, sampling_scheduler(m.scheduler_config, "ddim"), num_images=3,
                  sample_shape=m.sample_shape, steps=5, seed=2, batch_size=3)
    pipe.scheduler = pipe.scheduler.from_config(sampling_scheduler(m.scheduler_config, "ddim").config)
    img = pipe(prompt=captions, num_inference_steps=5, guidance_scale=1.0, generator=torch.Generator().manual_seed(2),
               output_type="pt").images
    assert ours.shape == (3, 3, 16, 16) and float((img - (ours / 2 + 0.5).clamp(0, 1)).abs().max()) < 1e-5


def test_timestep_experts_on_the_captioned_latents_counted_macs_equal_the_router(ws):
    """intervals -> experts -> router -> prune-experts on the latents, each row with its caption (the
    heads of self- and cross-attention elastic); the mixture's counted MACs are the router's and the
    captions reach every expert."""
    from diffprune.models.checkpoint import read_config
    from diffprune.targets import load_target

    p, root, _ = ws
    for name in ("intervals", "experts", "router", "prune-experts"):
        _run(p, root, name)
    space = read_config(root / "models/experts/elastic/expert-0")["meta"]["space"]
    assert any(u["name"].endswith("attn2") and u["units"] > 1 for u in space["units"])  # cross-attention heads
    router = json.loads((root / "models/experts/router/router.json").read_text())
    summary = json.loads((root / "models/experts/summary.json").read_text())
    assert summary["macs_per_expert"] == router["macs_per_expert"] and summary["trajectory_macs_ratio"] < 1.0
    paths = {"model": root / "models/experts/mixture", "vae": root / "models/autoencoder",
             "text": root / "models/text-encoder"}
    m = load_target("sd-experts", paths)
    out = _run(p, root, "evaluate@experts")
    rows = 2 if m.denoiser.guided.guided else 1
    traj = sum(mc * n for mc, n in zip(router["macs_per_expert"], router["steps_per_expert"]))
    assert out["metrics"]["trajectory_macs"] == rows * traj and out["metrics"]["macs_ratio_vs_teacher"] < 1.0
    g = m.denoiser.guided
    x, t = torch.randn(1, *m.sample_shape), torch.tensor([900])
    table = m.denoiser.table
    with torch.no_grad():
        a, b = (g._call(x, t, table.cond[k : k + 1], 0) for k in (0, 1))
    assert not torch.allclose(a, b)


def test_the_three_methods_register_and_load_into_stable_diffusion_pipeline_from_mlflow_in_a_fresh_process(
        ws, monkeypatch, tmp_path):
    """What users do with the results: Diff-Pruning's, DiP-GO's and the experts' registered models, in
    one fresh process, sample the library's images from MLflow, and each as diffusers'
    StableDiffusionPipeline (the workspace's VAE and text encoder around the pruned UNet, the schedule
    as a ScheduledNetwork, the mixture as TimestepRouted) draws the house sampler's images for the
    same prompts and seed (max difference < 1e-5)."""
    from diffprune.targets import captions_of, conditioning

    p, root, _ = ws
    if not (root / "models/experts/mixture").exists():  # run alone (-k): the expert stages first
        for name in ("intervals", "experts", "router", "prune-experts", "evaluate@experts"):
            _run(p, root, name)
    g = conditioning(root / "models/finetune")["guidance_scale"]
    prompts = captions_of(root / "models/finetune")[:3]
    got = registered_models_in_a_fresh_process(
        p, root, monkeypatch, tmp_path, {"prompt": prompts, "num_inference_steps": p.evaluate.steps,
                                         "guidance_scale": g})
    assert {n: one["net"] for n, one in got.items()} == {"finetune": "UNet2DConditionModel",
                                                         "dipgo": "ScheduledNetwork", "experts": "TimestepRouted"}
    for name, one in got.items():
        assert one["loaded"].denoiser.prompts(3) == prompts
        ours = house_images(one["loaded"], p.evaluate.steps)
        assert one["pipe"].shape == (3, 8, 8, 1) and float(abs(one["pipe"] - ours).max()) < 1e-5, name
    assert not np.array_equal(got["dipgo"]["pipe"], got["finetune"]["pipe"])


def test_a_latent_familys_model_paths_resolve_before_any_stage_was_fetched(tmp_path):
    """``stages.core.target_paths`` for the sd family in a fresh process that imported no stage module
    (a benchmark whose stage outputs were all cached): the family's kinds register on their own."""
    code = ("from pathlib import Path\nfrom diffprune.stages.core import target_paths\n"
            "print(sorted(target_paths(Path('ws'), 'experts', 'sd')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "['model', 'text', 'vae']"
