"""Contrastive gradient accumulation: a batch computed k micro-batches at a time trains the objective of the whole
batch. Oracle everywhere: the same model's ordinary `forward` on the whole batch (loss, every term, every gradient,
the CLIP-PING bank), or the towers called on each micro-batch by hand (BatchNorm statistics)."""

import copy
import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from conftest import all_objectives_model_and_batch, make_batch
from modeling_lightclip import LightCLIPModel
from modeling_lightclip.objectives_lightclip import training_targets_from
from modeling_lightclip.training.accumulation import ContrastiveAccumulation, micro_batches
from modeling_lightclip.training.recipes import build_model_config


TOWER_KEYS = ("input_ids", "attention_mask", "pixel_values")


def _engine_inputs(batch: dict) -> dict:
    inputs = {k: v for k, v in batch.items() if k in TOWER_KEYS}
    inputs["training_targets"] = training_targets_from({}, {k: v for k, v in batch.items() if k not in TOWER_KEYS})
    return inputs


def _one_batch(model, batch):
    reference = copy.deepcopy(model)
    out = reference(**batch, return_loss=True)
    out.loss.backward()
    return reference, out


def _assert_same_step(reference, out, model, terms, rtol=1e-4):
    torch.testing.assert_close(terms["loss"], out.loss.detach(), rtol=1e-5, atol=1e-6)
    assert set(terms) - {"loss"} == set(out.losses)
    for name, value in out.losses.items():
        torch.testing.assert_close(terms[name], value.detach(), rtol=1e-5, atol=1e-6, msg=name)
    expected = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=rtol, atol=1e-5, msg=name)


def test_micro_batches_cover_the_rows_once():
    assert micro_batches(10, 4) == [slice(0, 4), slice(4, 8), slice(8, 10)]
    assert micro_batches(3, 8) == [slice(0, 3)]
    with pytest.raises(ValueError):
        micro_batches(4, 0)


@pytest.mark.parametrize("variant", ["paper", "redesign", "sigmoid"])
@pytest.mark.parametrize("micro", [1, 3])
def test_micro_batches_train_the_objective_of_the_whole_batch(tokenizer, variant, micro):
    """Every objective at once (soft labels, token alignment, MLM with its fusion, CLIP-PING - bank or in-batch -,
    relation and cross-modal distillation, softmax or sigmoid): the loss, each term and every gradient equal those of
    one call on the 8 rows, and the CLIP-PING bank ends in the same state."""
    model, batch, bank = all_objectives_model_and_batch(tokenizer, variant)
    model.train()
    model.set_training_progress(1.0)
    reference, out = _one_batch(model, batch)
    assert all(p.grad is not None for p in reference.parameters()), "every parameter should get a gradient"
    terms = ContrastiveAccumulation(micro).step(model, _engine_inputs(batch))
    _assert_same_step(reference, out, model, terms)
    if bank is not None:
        for name, value in reference.objectives.ping.bank.state_dict().items():
            torch.testing.assert_close(model.objectives.ping.bank.state_dict()[name], value, msg=name)


class _ScoreMatrixRows(TorchDispatchMode):
    """Records the most rows of any matrix product with `columns` columns: the objectives' score matrices against a
    global batch of `columns` samples (rows @ columnsᵀ)."""

    def __init__(self, columns: int):
        super().__init__()
        self.columns, self.most_rows = columns, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default) and out.shape[1] == self.columns:
            self.most_rows = max(self.most_rows, out.shape[0])
        return out


@pytest.mark.parametrize("variant", ["paper", "redesign", "sigmoid"])
@pytest.mark.parametrize("micro", [1, 3])
def test_every_objective_is_scored_a_micro_batch_of_rows_at_a_time(tokenizer, variant, micro, monkeypatch):
    """Every objective at once - instance loss (softmax with soft labels, or sigmoid), token alignment, MLM, CLIP-PING
    (bank or in-batch), relation, cross-modal and feature distillation: the step equals one call on the 8 rows, and
    no score matrix against the 8 columns of the batch has more rows than a micro-batch. The control: an objective
    that says it is not row-decomposable makes the engine score the whole batch at once (8 x 8 matrices), with the
    same step."""
    model, batch, _ = all_objectives_model_and_batch(tokenizer, variant)
    assert model.objectives.row_decomposable
    model.train()
    model.set_training_progress(1.0)
    reference, out = _one_batch(model, batch)
    rows = batch["input_ids"].shape[0]
    with _ScoreMatrixRows(rows) as recorded:
        terms = ContrastiveAccumulation(micro).step(model, _engine_inputs(batch))
    _assert_same_step(reference, out, model, terms)
    assert recorded.most_rows == micro

    control, control_batch, _ = all_objectives_model_and_batch(tokenizer, variant)
    control.train()
    control.set_training_progress(1.0)
    monkeypatch.setattr(type(control.objectives.ping), "row_decomposable", False)
    assert not control.objectives.row_decomposable
    with _ScoreMatrixRows(rows) as recorded:
        terms = ContrastiveAccumulation(micro).step(control, _engine_inputs(control_batch))
    _assert_same_step(reference, out, control, terms)
    assert recorded.most_rows == rows


@pytest.mark.parametrize("fields", [
    {"mlm_batch_fraction": 0.3},                                          # MLM on some rows, picked across pieces
    {"token_objective": "filip", "token_matching": "sinkhorn", "vision_token_stage": -2},
])
def test_partial_mlm_rows_and_filip_tokens_match_one_batch(tokenizer, fields):
    """MLM on 30% of the rows - which rows is a rule on their place in the whole batch, so micro-batches pick the
    same ones - with the masking left to the model (drawn once for the whole batch); FILIP token scores from an
    earlier image stage."""
    model, batch, _ = all_objectives_model_and_batch(tokenizer, "redesign")
    config = model.config.to_dict()
    config.update(fields)
    torch.manual_seed(0)
    model = LightCLIPModel(type(model.config).from_dict(config)).train()
    with torch.no_grad():
        for block in model.objectives.mlm.fusion:
            block.attention_gate.fill_(0.5)
    model.set_training_progress(1.0)
    if "mlm_batch_fraction" in fields:
        batch = {k: v for k, v in batch.items() if k not in ("mlm_input_ids", "mlm_labels")}
    torch.manual_seed(7)
    reference, out = _one_batch(model, batch)
    torch.manual_seed(7)
    terms = ContrastiveAccumulation(3).step(model, _engine_inputs(batch))
    _assert_same_step(reference, out, model, terms)


def test_stored_text_outputs_and_a_locked_tower(tokenizer):
    """The locked text tower's stored outputs stand in for it in every micro-batch; the tower gets no gradient."""
    model, batch, _ = all_objectives_model_and_batch(tokenizer, "redesign")
    config = model.config.to_dict()
    config.update(token_loss_weight=0.0, mlm_loss_weight=0.0)
    torch.manual_seed(0)
    model = LightCLIPModel(type(model.config).from_dict(config)).train()
    model.lock_text_tower()
    model.set_training_progress(1.0)
    batch = {k: v for k, v in batch.items() if k not in ("mlm_input_ids", "mlm_labels")}
    with torch.no_grad():
        batch["text_tower_outputs"] = model.locked_text_outputs(batch["input_ids"], batch["attention_mask"])
    reference, out = _one_batch(model, batch)
    terms = ContrastiveAccumulation(3).step(model, _engine_inputs(batch))
    _assert_same_step(reference, out, model, terms)
    assert all(p.grad is None for p in model.text_model.parameters())


def test_dropout_draws_the_same_masks_when_a_micro_batch_is_run_again(tokenizer):
    """Pass 3 re-runs each micro-batch with the random state its pass 1 started from: the features it
    back-propagates through are the ones the loss was computed on, dropout included."""
    model, batch, _ = all_objectives_model_and_batch(tokenizer, "redesign")
    config = model.config.to_dict()
    config["text_config"].update(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
    model = LightCLIPModel(type(model.config).from_dict(config)).train()
    model.set_training_progress(1.0)
    calls = []
    original = model.training_features

    def recording(*args, **kwargs):
        features = original(*args, **kwargs)
        calls.append(features.text_embeds.detach().clone())
        return features

    model.training_features = recording
    ContrastiveAccumulation(4).step(model, _engine_inputs(batch))
    assert len(calls) == 4
    for first, again in ((0, 2), (1, 3)):
        torch.testing.assert_close(calls[again], calls[first])
    with torch.no_grad():  # without the replay, dropout draws other masks: the comparison above can fail
        fresh = original(batch["input_ids"][:4], batch["pixel_values"][:4], batch["attention_mask"][:4],
                         training_targets={k: batch[k][:4] for k in ("mlm_input_ids", "mlm_labels")})
    assert not torch.allclose(fresh.text_embeds, calls[0])


def test_batch_norm_statistics_update_once_per_micro_batch(tiny_recipe, tokenizer):
    """A BatchNorm tower (the tiny ResNet): normalisation over each micro-batch and its running statistics updated
    once per micro-batch - oracle: the image tower run on each micro-batch by hand, in training mode."""
    config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, mlm_loss_weight=0.0,
                                soft_label_mode="none")
    torch.manual_seed(0)
    model = LightCLIPModel(config).train()
    batch = make_batch(tokenizer, batch_size=8)
    oracle = copy.deepcopy(model)
    with torch.no_grad():
        for piece in micro_batches(8, 3):
            oracle.vision_model(pixel_values=batch["pixel_values"][piece])
    ContrastiveAccumulation(3).step(model, _engine_inputs(batch))
    buffers = dict(model.vision_model.named_buffers())
    tracked = [name for name in buffers if name.endswith("num_batches_tracked")]
    assert tracked and all(int(buffers[name]) == 3 for name in tracked)
    for name, value in oracle.vision_model.named_buffers():
        torch.testing.assert_close(buffers[name], value, msg=name)


# ---------------------------------------------------------------------------------------------- the trainer


RECIPE = {
    "image_size": 32, "projection_dim": 16, "token_projection_dim": 16, "fusion_num_heads": 2,
    "soft_label_mode": "similarity", "soft_label_max": 0.3, "soft_label_schedule": "constant",
    "soft_label_source": "student", "token_loss_weight": 0.5, "mlm_loss_weight": 0.5,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
    "text_config": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                    "intermediate_size": 64, "max_position_embeddings": 32, "hidden_dropout_prob": 0.0,
                    "attention_probs_dropout_prob": 0.0},
}


def _train(argv):
    import train_lightclip

    return train_lightclip.main(argv)


def test_gradient_accumulation_steps_trains_the_whole_batch_and_the_card_says_so(tmp_path, tokenizer):
    """`--gradient_accumulation_steps 2` with batches of 4 takes the same optimiser step as one batch of 8 (SGD, so
    the weights' difference is the gradients' difference times the learning rate), logs the same loss, and records
    the global batch of 8 computed 4 rows at a time."""
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": RECIPE, "tokenizer": {"vocab_size": 300, "model_max_length": 32}}))
    tokenizer.save_pretrained(tmp_path / "tokenizer")  # one vocabulary for both runs (training one may tie-break)
    common = ["--recipe", str(recipe), "--tokenizer_name", str(tmp_path / "tokenizer"), "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "2",
              "--logging_steps", "1", "--dataloader_num_workers", "0", "--optim", "sgd", "--learning_rate", "0.1",
              "--do_eval", "false", "--seed", "3"]
    runs = {"one_batch": ["--per_device_train_batch_size", "8"],
            "accumulated": ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]}
    for name, flags in runs.items():
        _train(common + flags + ["--output_dir", str(tmp_path / name)])
    weights = {name: load_file(str(tmp_path / name / "model.safetensors")) for name in runs}
    for key, value in weights["one_batch"].items():
        torch.testing.assert_close(weights["accumulated"][key], value, rtol=1e-4, atol=1e-6, msg=key)
    losses = {}
    for name in runs:
        state = json.loads((tmp_path / name / "trainer_state.json").read_text())
        losses[name] = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
        assert state["global_step"] == 2
    assert losses["accumulated"] == pytest.approx(losses["one_batch"], rel=1e-4)
    info = json.loads((tmp_path / "accumulated" / "training_info.json").read_text())
    assert info["global_batch_size"] == 8 and info["micro_batch_size"] == 4
    card = (tmp_path / "accumulated" / "README.md").read_text()
    assert "global batch 8 (every loss over the whole global batch, its towers computed 4 rows at a time" in card


def test_compiled_towers_and_a_resumed_run_take_the_same_accumulated_steps(tmp_path, tokenizer):
    """Accumulation with the towers compiled (dynamo, eager backend: the same numbers when dynamo traces them
    right) and a run resumed from the checkpoint after its first step (checkpoints fall between optimiser steps,
    never inside one) both end with the weights of the uninterrupted, uncompiled accumulated run."""
    from safetensors.torch import load_file

    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"model": RECIPE, "tokenizer": {"vocab_size": 300, "model_max_length": 32}}))
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    common = ["--recipe", str(recipe), "--tokenizer_name", str(tmp_path / "tokenizer"), "--max_train_samples", "32",
              "--max_steps", "2", "--logging_steps", "1", "--dataloader_num_workers", "0", "--optim", "sgd",
              "--learning_rate", "0.1", "--do_eval", "false", "--seed", "3", "--per_device_train_batch_size", "4",
              "--gradient_accumulation_steps", "2", "--caption_padding", "max_length"]
    _train(common + ["--output_dir", str(tmp_path / "plain"), "--save_strategy", "steps", "--save_steps", "1"])
    _train(common + ["--output_dir", str(tmp_path / "compiled"), "--torch_compile", "true",
                     "--torch_compile_backend", "eager"])
    _train(common + ["--output_dir", str(tmp_path / "resumed"), "--resume_from_checkpoint",
                     str(tmp_path / "plain" / "checkpoint-1")])
    plain = load_file(str(tmp_path / "plain" / "model.safetensors"))
    assert any(not torch.equal(plain[k], v) for k, v in
               load_file(str(tmp_path / "plain" / "checkpoint-1" / "model.safetensors")).items())  # step 2 moved them
    for name in ("compiled", "resumed"):
        other = load_file(str(tmp_path / name / "model.safetensors"))
        for key, value in plain.items():
            torch.testing.assert_close(other[key], value, rtol=1e-4, atol=1e-6, msg=f"{name}: {key}")


def test_the_trainers_own_accumulation_is_refused(tiny_model, tokenizer):
    """Plain `TrainingArguments` with gradient accumulation would give each micro-batch a loss of its own."""
    from transformers import TrainingArguments

    from modeling_lightclip.training.trainer import LightCLIPTrainer

    args = TrainingArguments(output_dir="unused", gradient_accumulation_steps=2, per_device_train_batch_size=2,
                             use_cpu=True, report_to=[])
    trainer = LightCLIPTrainer(model=tiny_model, args=args)
    with pytest.raises(ValueError, match="a contrastive loss of its own"):
        trainer.training_step(tiny_model, make_batch(tokenizer, batch_size=2))


@pytest.mark.parametrize("flags, message", [
    ({"gradient_accumulation_steps": 2, "micro_batch_size": 2}, "both ask for accumulation"),
    ({"micro_batch_size": 0}, ">= 1"),
    ({"gradient_accumulation_steps": 2, "torch_compile": True, "torch_compile_scope": "model"},
     "--torch_compile_scope towers"),
])
def test_accumulation_flags_that_cannot_work_are_refused(tmp_path, flags, message):
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments

    with pytest.raises(ValueError, match=message):
        LightCLIPTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True, **flags)


def test_gradient_accumulation_steps_becomes_contrastive_accumulation(tmp_path):
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments

    args = LightCLIPTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=64,
                                      gradient_accumulation_steps=4, use_cpu=True)
    assert (args.per_device_train_batch_size, args.micro_batch_size, args.gradient_accumulation_steps) == (256, 64, 1)
    assert args.contrastive_accumulation_steps == 4
    same = LightCLIPTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=256, micro_batch_size=64,
                                      use_cpu=True)
    assert (same.per_device_train_batch_size, same.micro_batch_size, same.gradient_accumulation_steps) == (256, 64, 1)


# ---------------------------------------------------------------------------------------------- gradient checkpointing


def _counting_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *args: calls.append(1))
    return calls


@pytest.mark.parametrize("tower", ["transformers", "timm"])
def test_gradient_checkpointing_recomputes_the_towers_and_leaves_the_step_unchanged(tokenizer, tiny_recipe, tower):
    """`gradient_checkpointing_enable()` (`--gradient_checkpointing`) reaches both towers - transformers' switch for
    CLIP/BERT layers, timm's own for a timm tower - so a module inside a checkpointed block runs again during backward
    (counted), and the loss
    and every gradient stay those without it."""
    if tower == "transformers":
        model, batch, _ = all_objectives_model_and_batch(tokenizer, "redesign")
        image_block = model.vision_model.encoder.layers[0].mlp
    else:
        pytest.importorskip("timm")
        config = build_model_config(dict(tiny_recipe["model"], vision_config={"model_type": "timm_wrapper",
                                                                              "architecture": "resnet10t"}),
                                    tokenizer, token_loss_weight=0.0, mlm_loss_weight=0.0, soft_label_mode="none")
        torch.manual_seed(0)
        model = LightCLIPModel(config)
        batch = make_batch(tokenizer, batch_size=4)
        image_block = model.vision_model.timm_model.layer2[0]
    model.train()
    model.set_training_progress(1.0)
    torch.manual_seed(5)  # the same dropout masks in both calls (checkpointing replays them in its recomputation)
    reference, out = _one_batch(model, batch)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.gradient_checkpointing_towers == {"image": True, "text": True}
    image_calls, text_calls = _counting_calls(image_block), _counting_calls(model.text_model.encoder.layer[0].intermediate)
    torch.manual_seed(5)
    checkpointed = model(**batch, return_loss=True)
    assert len(image_calls) == len(text_calls) == 1
    checkpointed.loss.backward()
    assert (len(image_calls), len(text_calls)) == (2, 2)  # recomputed in backward: activations were not kept
    torch.testing.assert_close(checkpointed.loss, out.loss)
    for (name, expected), got in zip(reference.named_parameters(), model.parameters()):
        if expected.grad is not None:
            torch.testing.assert_close(got.grad, expected.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_tower_without_checkpointing_is_named(tiny_recipe, tokenizer, caplog):
    """transformers' ResNet has no gradient checkpointing: enabling it says so instead of pretending."""
    config = build_model_config(tiny_recipe["model"], tokenizer)
    model = LightCLIPModel(config)
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing_towers == {"image": False, "text": True}


def test_bf16_autocast_micro_batches_match_one_bf16_batch(tokenizer):
    """Mixed precision (the Trainer passes accelerate's autocast): the towers and the objectives run under bf16
    autocast in every pass - pass 3's bf16 outputs take the cached gradient in their own dtype - and the step matches
    one bf16 batch to bf16 precision."""
    model, batch, _ = all_objectives_model_and_batch(tokenizer, "redesign")
    model.train()
    model.set_training_progress(1.0)
    reference = copy.deepcopy(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = reference(**batch, return_loss=True)
    out.loss.backward()
    autocast = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    terms = ContrastiveAccumulation(3, autocast=autocast).step(model, _engine_inputs(batch))
    torch.testing.assert_close(terms["loss"], out.loss.detach().float(), rtol=2e-2, atol=2e-2)
    expected = torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])
    got = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    assert torch.nn.functional.cosine_similarity(got, expected, dim=0) > 0.99


def test_images_reach_the_device_one_micro_batch_at_a_time(tokenizer):
    """`images_to_device` is applied to each micro-batch's images before each of its two tower calls, never to the
    whole batch, and the step is that of the batch it produces. Oracle: one call on the images it maps to (here the
    "host" copy is stored doubled in float64, so an engine that skipped the mapping would train other images)."""
    model, batch, _ = all_objectives_model_and_batch(tokenizer, "redesign")
    model.train()
    model.set_training_progress(1.0)
    reference, out = _one_batch(model, batch)
    calls = []

    def images_to_device(images):
        calls.append(images.shape[0])
        return (images / 2).to(torch.float32)

    inputs = _engine_inputs(batch)
    inputs["pixel_values"] = batch["pixel_values"].double() * 2
    terms = ContrastiveAccumulation(3, images_to_device=images_to_device).step(model, inputs)
    assert calls == [3, 3, 2, 3, 3, 2]  # pass 1 then pass 3, one micro-batch at a time
    _assert_same_step(reference, out, model, terms)


def test_the_trainer_keeps_the_batchs_images_on_the_host(tokenizer, monkeypatch):
    """Under contrastive accumulation the training loader leaves batches where the collator made them, the trainer
    moves the text side whole and hands the images over one micro-batch at a time (uint8 `--images_on_device` images
    normalised per micro-batch); the step equals one call on the whole normalised batch. Without accumulation the
    loader places batches on the device as usual."""
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments
    from modeling_lightclip.training.data import normalize_on_device
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.trainer import LightCLIPTrainer

    model, batch, _ = all_objectives_model_and_batch(tokenizer, "redesign")
    model.set_training_progress(1.0)
    processor = build_processor(32, tokenizer)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    batch["pixel_values"] = normalize_on_device(images, processor.image_processor)
    model.train()
    reference, out = _one_batch(model, batch)

    def trainer(**flags):
        args = LightCLIPTrainingArguments(output_dir="/tmp/unused", report_to=[], use_cpu=True,
                                          per_device_train_batch_size=8, **flags)
        return LightCLIPTrainer(model=model, args=args, processing_class=processor,
                                train_dataset=[{"i": i} for i in range(16)], data_collator=lambda rows: rows)

    assert trainer().get_train_dataloader().device is not None
    accumulating = trainer(micro_batch_size=3)
    assert accumulating.get_train_dataloader().device is None
    moved = []
    to_device = accumulating._images_to_device
    monkeypatch.setattr(accumulating, "_images_to_device", lambda x: moved.append(tuple(x.shape)) or to_device(x))
    inputs = {**_engine_inputs(batch), "pixel_values": images, "return_loss": True}
    loss = accumulating.training_step(model, inputs)
    assert [rows for rows, *_ in moved] == [3, 3, 2, 3, 3, 2]
    torch.testing.assert_close(loss, out.loss.detach(), rtol=1e-5, atol=1e-6)
    for (name, param), expected in zip(model.named_parameters(), reference.parameters()):
        if expected.grad is not None:
            torch.testing.assert_close(param.grad, expected.grad, rtol=1e-4, atol=1e-5, msg=name)
