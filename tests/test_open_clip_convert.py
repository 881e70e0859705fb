"""OpenCLIP -> transformers CLIPModel: a random OpenCLIP model saved as OpenCLIP saves models converts into a
CLIPModel folder whose embeddings and logits equal OpenCLIP's (1e-4), through its own processor too; the folder
starts a LightCLIP run; architectures that do not map are refused naming what does not."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import CAPTIONS, FIXTURES
from test_reinforce import _open_clip_teacher


def test_an_open_clip_checkpoint_becomes_a_clip_model_with_equal_logits(tmp_path):
    import open_clip
    from transformers import CLIPModel, CLIPProcessor

    from modeling_lightclip.training.open_clip_convert import main

    source = _open_clip_teacher(tmp_path / "oc")
    out = tmp_path / "clip"
    assert main([f"local-dir:{source}", "--out", str(out)]) == 0
    model, processor = CLIPModel.from_pretrained(out).eval(), CLIPProcessor.from_pretrained(out)
    reference, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{source}")
    tokenize = open_clip.get_tokenizer(f"local-dir:{source}")
    reference.eval()
    images = [Image.open(FIXTURES / name).convert("RGB") for name in ("astronaut.jpg", "chelsea_cat.jpg")]
    captions = CAPTIONS[:4] + ["Mixed CASE, punctuation & spaces!!  ok"]
    enc = processor(text=captions, images=images, padding=True, return_tensors="pt")
    ours = tokenize(captions)
    for row, caption in enumerate(captions):  # the same token ids as OpenCLIP's tokenizer
        length = int(enc["attention_mask"][row].sum())
        assert enc["input_ids"][row, :length].tolist() == ours[row, :length].tolist(), caption
    pixels = torch.stack([preprocess(image) for image in images])
    torch.testing.assert_close(enc["pixel_values"], pixels, atol=0.02, rtol=0)  # PIL vs HF resize, same pipeline
    with torch.no_grad():
        out_hf = model(**enc)
        expected_image = F.normalize(reference.encode_image(enc["pixel_values"]), dim=-1)
        expected_text = F.normalize(reference.encode_text(ours), dim=-1)
        expected_logits = reference.logit_scale.exp() * expected_image @ expected_text.t()
    torch.testing.assert_close(F.normalize(out_hf.image_embeds, dim=-1), expected_image, atol=1e-4, rtol=0)
    torch.testing.assert_close(F.normalize(out_hf.text_embeds, dim=-1), expected_text, atol=1e-4, rtol=0)
    torch.testing.assert_close(out_hf.logits_per_image, expected_logits, atol=1e-4, rtol=0)

    import train_lightclip  # a start for --model_name_or_path

    trainer = train_lightclip.main(["--model_name_or_path", str(out), "--max_steps", "1", "--max_train_samples", "8",
                                    "--per_device_train_batch_size", "4", "--do_eval", "false",
                                    "--output_dir", str(tmp_path / "run"), "--report_to", "none"])
    assert trainer.state.global_step == 1 and np.isfinite(trainer.state.log_history[-1]["train_loss"])


@pytest.mark.parametrize("change, named", [
    ({"vision_cfg": {"timm_model_name": "resnet50"}}, "not a ViT"),
    ({"vision_cfg": {"layers": [3, 4, 6, 3], "width": 64}}, "not a ViT"),
    ({"text_cfg": {"hf_model_name": "xlm-roberta-base"}}, "Hugging Face xlm-roberta-base"),
    ({"init_logit_bias": -10}, "SigLIP"),
    ({"vision_cfg": {"attentional_pool": True}}, "attentional_pool=True"),
    ({"text_cfg": {"pool_type": "last"}}, "pool_type='last'"),
])
def test_what_does_not_map_is_named(change, named):
    from modeling_lightclip.training.open_clip_convert import unmappable

    config = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    assert unmappable(config) == []
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    assert any(named in problem for problem in unmappable(config)), unmappable(config)
