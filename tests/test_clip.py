"""The CLIP score on a tiny CLIP saved locally (no downloads), and its honest absence without weights."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from diffprune.metrics.clip import clip_score
from diffprune.models.sd import tiny_tokenizer

PROMPTS = ["a handwritten 3", "a handwritten 7"]


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tok = tiny_tokenizer()
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, max_position_embeddings=24,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=16, patch_size=4),
                     projection_dim=8)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clip") / "tiny-clip"
    CLIPModel(cfg).save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 16},
                                                            crop_size={"height": 16, "width": 16}), tokenizer=tok)
    proc.save_pretrained(folder)
    return folder


def test_clip_score_is_the_mean_clamped_cosine_of_the_clip_embeddings(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    got = clip_score(images, PROMPTS, clip_dir)
    model, proc = CLIPModel.from_pretrained(clip_dir).eval(), CLIPProcessor.from_pretrained(clip_dir)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    inputs = proc(text=PROMPTS, images=list(pixels), return_tensors="pt", padding=True)
    with torch.no_grad():  # the projections of the towers' pooled outputs, computed by hand
        e_i = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        e_t = model.text_projection(model.text_model(input_ids=inputs["input_ids"],
                                                     attention_mask=inputs["attention_mask"]).pooler_output)
    want = (100 * F.cosine_similarity(e_i, e_t)).clamp_min(0).mean()
    assert got.score == pytest.approx(float(want), abs=1e-3) and str(clip_dir) in got.label
    assert clip_score(images, PROMPTS, clip_dir) == got  # deterministic


def test_without_weights_the_score_is_absent_and_says_why(tmp_path, monkeypatch):
    images = torch.zeros(2, 3, 16, 16)
    none = clip_score(images, PROMPTS, None)
    assert none.score is None and "not measured" in none.label
    missing = clip_score(images, PROMPTS, tmp_path / "no-clip")
    assert missing.score is None and "no such folder" in missing.label
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = clip_score(images, PROMPTS, "openai/clip-vit-large-patch14")
    assert offline.score is None and "not reachable" in offline.label
    with pytest.raises(ValueError, match="3 prompts"):
        clip_score(images, PROMPTS + ["x"], None)
