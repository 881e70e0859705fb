"""GPU-pace switches, checked on CPU: channels-last towers, shapes that compile once, uint8 batches normalised on
the device, data-loader defaults, and one fused text pass for MLM. Speed itself is measured in benchmarks/."""

import hashlib

import numpy as np
import pytest
import torch
from conftest import CAPTIONS, FIXTURES, make_batch


def _model(tokenizer, recipe="mobilenetv2", image_size=64, **overrides):
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config, load_recipe

    config = build_model_config(load_recipe(recipe)["model"], tokenizer, image_size=image_size, **overrides)
    torch.manual_seed(0)
    return LightCLIPModel(config)


@pytest.mark.parametrize("recipe", ["mobilenetv2", "resnet18"])
def test_channels_last_equals_nchw_and_saves_the_same_bytes(tokenizer, tmp_path, recipe):
    model = _model(tokenizer, recipe, token_loss_weight=0.5, mlm_loss_weight=0.5,
                        soft_label_mode="similarity", soft_label_source="student")
    assert model.is_convolutional
    batch = make_batch(tokenizer, batch_size=4, image_size=64)
    conv = next(m for m in model.vision_model.modules() if isinstance(m, torch.nn.Conv2d))

    def loss_and_grad(train: bool):
        model.train(train)
        torch.manual_seed(1)  # the same MLM masking (drawn in forward) and dropout for both layouts
        out = model(**batch, return_loss=True)
        return out, torch.autograd.grad(out.loss, [conv.weight])[0]

    # gradients compared in eval mode: train-mode BatchNorm over 4 images at a 2x2 map is so ill-conditioned that
    # float32 NCHW itself is ~2% off a float64 computation there. Each layout starts from the same state (the
    # train-mode pass moves BatchNorm's running statistics).
    start = {k: v.clone() for k, v in model.state_dict().items()}
    (_, reference_grad), (reference, _) = loss_and_grad(False), loss_and_grad(True)
    model.load_state_dict(start)
    model.save_pretrained(tmp_path / "nchw")

    model.set_channels_last(True)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and not conv.weight.is_contiguous()
    model.save_pretrained(tmp_path / "channels_last")
    (_, fast_grad), (fast, _) = loss_and_grad(False), loss_and_grad(True)
    torch.testing.assert_close(fast.image_embeds, reference.image_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.loss, reference.loss, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast_grad.contiguous(), reference_grad, rtol=1e-3, atol=1e-4)
    digest = [hashlib.sha256((tmp_path / d / "model.safetensors").read_bytes()).hexdigest()
              for d in ("nchw", "channels_last")]
    assert digest[0] == digest[1]


def test_channels_last_switch_resolves_per_device_and_tower(monkeypatch, tokenizer):
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments

    cnn = _model(tokenizer)
    auto = LightCLIPTrainingArguments(output_dir="/tmp/unused", report_to=[])
    off = LightCLIPTrainingArguments(output_dir="/tmp/unused", channels_last="false")
    with pytest.raises(ValueError, match="--channels_last"):
        LightCLIPTrainingArguments(output_dir="/tmp/unused", channels_last="yes")
    assert not auto.use_channels_last(cnn)  # no CUDA here
    vit = _model(tokenizer, "vit_xs", image_size=224)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert auto.use_channels_last(cnn) and not vit.is_convolutional and not auto.use_channels_last(vit)
    assert not off.use_channels_last(cnn)


def test_loader_workers_default_from_the_cpu_count(monkeypatch):
    from modeling_lightclip.training import arguments
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments

    cpu = LightCLIPTrainingArguments(output_dir="/tmp/unused")
    assert cpu.dataloader_num_workers == 0 and not cpu.dataloader_persistent_workers
    monkeypatch.setattr(arguments, "auto_num_workers", lambda: 7)
    gpu = LightCLIPTrainingArguments(output_dir="/tmp/unused")
    assert (gpu.dataloader_num_workers, gpu.dataloader_persistent_workers, gpu.dataloader_prefetch_factor) == (7, True, 4)
    assert LightCLIPTrainingArguments(output_dir="/tmp/unused", dataloader_num_workers=2).dataloader_num_workers == 2
    monkeypatch.undo()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(arguments.os, "sched_getaffinity", lambda pid: set(range(40)), raising=False)
    assert arguments.auto_num_workers() == 16
    monkeypatch.setattr(arguments.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert arguments.auto_num_workers() == 3


def test_uint8_batches_normalised_on_device_equal_the_float_path(tokenizer):
    from PIL import Image

    from modeling_lightclip.training.data import ImageTextCollator, normalize_on_device
    from modeling_lightclip.training.preprocessing import build_processor

    processor = build_processor(48, tokenizer)
    examples = [{"image": Image.open(FIXTURES / name), "caption": caption}
                for name, caption in (("astronaut.jpg", CAPTIONS[0]), ("chelsea_cat.jpg", CAPTIONS[1]))]
    floats = ImageTextCollator(processor, train=True, seed=3)(examples)
    small = ImageTextCollator(processor, train=True, seed=3, uint8_images=True)(examples)
    assert small["pixel_values"].dtype == torch.uint8
    assert small["pixel_values"].element_size() * 4 == floats["pixel_values"].element_size()
    torch.testing.assert_close(normalize_on_device(small["pixel_values"], processor.image_processor),
                               floats["pixel_values"], rtol=0, atol=1e-5)
    assert torch.equal(small["input_ids"], floats["input_ids"])


def test_trainer_normalises_uint8_batches(tokenizer, tiny_model):
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments
    from modeling_lightclip.training.data import normalize_on_device
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.trainer import LightCLIPTrainer

    processor = build_processor(32, tokenizer)
    trainer = LightCLIPTrainer(model=tiny_model, args=LightCLIPTrainingArguments(output_dir="/tmp/unused",
                                                                                 report_to=[]),
                               processing_class=processor)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    seen = {}
    tiny_model.register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs), with_kwargs=True)
    text = tokenizer(CAPTIONS[:2], padding=True, return_tensors="pt")
    trainer.compute_loss(tiny_model, {"pixel_values": images, **text, "return_loss": True})
    assert seen["pixel_values"].dtype == torch.float32
    expected = (images.float() / 255 - torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)) \
        / torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(seen["pixel_values"], expected)
    assert torch.equal(normalize_on_device(images, processor.image_processor), seen["pixel_values"])


def test_fixed_length_padding_gives_one_text_shape(tokenizer):
    from PIL import Image

    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.preprocessing import build_processor

    processor = build_processor(32, tokenizer)
    image = np.zeros((40, 40, 3), dtype=np.uint8)

    short = [{"image": Image.fromarray(image), "caption": "a cat"}]
    long = [{"image": Image.fromarray(image), "caption": CAPTIONS[0]}]
    for fixed in (False, True):
        collator = ImageTextCollator(processor, train=False, max_length=24, pad_to_max_length=fixed)
        widths = {collator(batch)["input_ids"].shape[1] for batch in (short, long)}
        lengths = {len(tokenizer(batch[0]["caption"])["input_ids"]) for batch in (short, long)}
        assert len(lengths) == 2 and widths == ({24} if fixed else lengths)


def test_compiled_towers_never_recompile_after_the_first_step(tmp_path, monkeypatch):
    """`--torch_compile` (towers scope) on the tiny recipe with every objective on, dynamo's eager backend (what is
    counted is dynamo's frame conversions: backend-independent): everything compiles in step 1 and nothing after,
    with no graph break; padding captions to their longest instead recompiles (the control)."""
    import torch._dynamo
    from conftest import saved_tokenizer
    from torch._dynamo.utils import counters
    from transformers import TrainerCallback

    import train_lightclip
    from modeling_lightclip.training import trainer as trainer_module

    tokenizer_dir = saved_tokenizer(tmp_path)

    def frames_per_step(padding):
        torch._dynamo.reset()
        counters.clear()
        seen = []

        class _Count(TrainerCallback):
            def on_step_end(self, *args, **kwargs):
                seen.append(counters["frames"]["total"])

        original = trainer_module.LightCLIPTrainer.__init__

        def _init(self, *args, callbacks=None, **kwargs):
            original(self, *args, callbacks=list(callbacks or []) + [_Count()], **kwargs)

        monkeypatch.setattr(train_lightclip.LightCLIPTrainer, "__init__", _init)
        trainer = train_lightclip.main([
            "--recipe", "tiny", "--max_train_samples", "64", "--per_device_train_batch_size", "8", "--max_steps", "6",
            "--do_eval", "false", "--tokenizer_name", str(tokenizer_dir), "--output_dir", str(tmp_path / padding),
            "--torch_compile", "true", "--torch_compile_backend", "eager", "--caption_padding", padding,
            "--dataloader_num_workers", "0", "--report_to", "none"])
        monkeypatch.undo()
        return seen, dict(counters["graph_break"]), trainer

    seen, breaks, trainer = frames_per_step("max_length")
    assert seen[0] > 0 and len(set(seen)) == 1, seen  # compiled in step 1, nothing recompiled in steps 2..6
    assert not breaks
    model = trainer.model
    assert type(model).__name__ == "LightCLIPModel"  # the Trainer did not wrap the whole model
    assert model.vision_model._compiled_call_impl is not None and model.text_model._compiled_call_impl is not None
    assert all(not key.startswith("_orig_mod") for key in model.state_dict())
    saved = trainer.args  # what training_args.bin pickles: it says what ran
    assert (tmp_path / "max_length" / "training_args.bin").is_file()
    assert saved.torch_compile and saved.torch_compile_backend == "eager" and saved.torch_compile_scope == "towers"
    card = (tmp_path / "max_length" / "README.md").read_text()
    assert "(fp32 precision, towers compiled with torch.compile (backend eager), 0 loader worker(s) per process)" in card
    control, _, _ = frames_per_step("longest")
    assert len(set(control)) > 1, control


def _large_jpeg(size=(2400, 1800)) -> bytes:
    """A photo-sized JPEG (the cat photo scaled up: real content, a phone camera's pixel count)."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(FIXTURES / "chelsea_cat.jpg").convert("RGB").resize(size, Image.Resampling.BICUBIC).save(
        buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_large_jpegs_decode_reduced_but_never_below_the_size_the_crop_needs():
    """Oracle: the full decode, downscaled by PIL to the same size, and the crop geometry worked out by hand."""
    import io
    import math

    from PIL import Image

    from modeling_lightclip.training.data import _decode_short_side, load_image
    from modeling_lightclip.training.preprocessing import build_image_processor

    data = _large_jpeg()
    # smallest crop of a 224-px run: 80% of the area at aspect 3/4 -> short side sqrt(0.8 * 3/4) of the image's
    needed = _decode_short_side(build_image_processor(224), 0.8)
    assert needed == math.ceil(224 / math.sqrt(0.8 * 0.75))
    reduced = load_image(data, min_short_side=needed)
    assert reduced.size == (600, 450)  # 1/4: 1800 / 4 = 450 >= 290; 1/8 would give 225 < 290
    full = Image.open(io.BytesIO(data)).convert("RGB")
    reference = np.asarray(full.resize(reduced.size, Image.Resampling.BOX), dtype=np.float32)
    assert np.abs(np.asarray(reduced, dtype=np.float32) - reference).mean() < 2.0  # of 255: the same picture
    # nothing to gain (short side < twice the need), other formats, or no need given: decoded in full
    assert load_image(data, min_short_side=1000).size == (2400, 1800)
    assert load_image(data).size == (2400, 1800)
    png = io.BytesIO()
    full.save(png, format="PNG")
    assert load_image(png.getvalue(), min_short_side=needed).size == (2400, 1800)


def test_training_collator_decodes_large_jpegs_reduced_and_evaluation_in_full(tokenizer):
    """Training batches from the reduced decode match the full decode's within a few levels of 255 (no crop, no flip,
    so the two differ only by the decoding); evaluation batches equal the processor on the fully decoded image, as at
    inference."""
    import io

    from PIL import Image

    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.preprocessing import build_processor

    processor = build_processor(224, tokenizer)
    examples = [{"image": {"bytes": _large_jpeg(), "path": None}, "caption": CAPTIONS[0]}]
    options = dict(train=True, random_resized_crop_scale=1.0, horizontal_flip=False, uint8_images=True)
    reduced = ImageTextCollator(processor, **options)
    full = ImageTextCollator(processor, **options, jpeg_draft_decoding=False)
    assert reduced._decode_short_side == 224 and full._decode_short_side is None
    difference = (reduced(examples)["pixel_values"].float() - full(examples)["pixel_values"].float()).abs()
    assert difference.mean() < 2.0
    evaluation = ImageTextCollator(processor, train=False)(examples)["pixel_values"]
    expected = processor.image_processor(Image.open(io.BytesIO(examples[0]["image"]["bytes"])).convert("RGB"),
                                         return_tensors="pt")["pixel_values"]
    assert torch.equal(evaluation, expected)
