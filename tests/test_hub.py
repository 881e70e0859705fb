"""Model card, push (up to the upload call), native CLIPModel export and LoRA merge."""

import json
import re
from pathlib import Path

import pytest
import torch

from conftest import make_batch
from modeling_lightclip import LightCLIPModel
from modeling_lightclip.training.hub import HubUploadError, export_clip, push_folder
from modeling_lightclip.training.preprocessing import build_processor
from modeling_lightclip.training.recipes import build_model_config
import train_lightclip


CLIP_SHAPED = {
    "image_size": 32, "projection_dim": 16, "token_projection_dim": 8, "fusion_num_heads": 2,
    "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 8},
    "text_config": {"model_type": "clip_text_model", "hidden_size": 32, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32},
}


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    import train_lightclip

    out = tmp_path_factory.mktemp("trained") / "run"
    train_lightclip.main(["--recipe", "tiny", "--max_steps", "3", "--max_train_samples", "48", "--max_eval_samples",
                          "32", "--per_device_train_batch_size", "8", "--output_dir", str(out),
                          "--hub_model_id", "someone/tiny-lightclip"])
    return out


def test_model_card_has_real_values_and_valid_metadata(trained_folder):
    from importlib.metadata import version

    from huggingface_hub import ModelCard

    card = ModelCard.load(trained_folder / "README.md")
    data = card.data
    assert data.pipeline_tag == "zero-shot-image-classification"
    assert data.library_name == "transformers" and data.license == "apache-2.0"
    assert "custom_code" in data.tags
    assert getattr(data, "widget", None) is None          # the Hub runs no custom code: no widget promised
    assert data.datasets == ["zalando-datasets/fashion_mnist"]   # the embedded data, named
    metrics = json.loads((trained_folder / "eval_results.json").read_text())
    reported = {(r.task_type, r.metric_type, r.metric_name): r.metric_value for r in data.eval_results}
    assert reported[("zero-shot-image-classification", "accuracy", "zero-shot top-1 accuracy")] == \
        round(metrics["eval_zero_shot_top1"], 4)
    assert reported[("image-feature-extraction", "recall_at_5", "image→text R@5")] == \
        round(metrics["eval_image_to_text_r5"], 4)
    assert reported[("image-feature-extraction", "recall_at_10", "text→image R@10")] == \
        round(metrics["eval_text_to_image_r10"], 4)
    assert not {r.task_type for r in data.eval_results} & {"image-to-text", "text-to-image"}   # generation tasks
    text = card.text
    assert "{{" not in text and "}}" not in text
    assert 'AutoModel.from_pretrained("someone/tiny-lightclip", trust_remote_code=True)' in text
    assert "no hosted inference widget" in text
    assert re.search(r"image encoder \*\*[0-9.]+ ms\*\*, text encoder \*\*[0-9.]+ ms\*\*", text)
    model = LightCLIPModel.from_pretrained(trained_folder)
    inference = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("objectives."))
    assert f"{inference / 1e3:.1f}k parameters on the inference path" in text
    state = json.loads((trained_folder / "trainer_state.json").read_text())
    assert f"for {state['global_step']} steps" in text
    # the tiny recipe trains the papers' objectives: the card says so, row by row, and names the teachers
    assert "| token alignment (relaxed bipartite matching) | 0.5 |" in text
    assert ("the CLIP contrastive loss plus soft labels (similarity, from the student's own similarities), token "
            "alignment (LightCLIP), masked language modelling with image fusion (LightCLIP)") in text
    assert "No teacher" in text                 # none of the tiny recipe's objectives reads frozen encoders
    assert "arXiv:2312.00674" in text and "arXiv:2412.03871" in text   # both papers cited
    assert f"torch {version('torch')}" in text and f"transformers {version('transformers')}" in text
    runtime = json.loads((trained_folder / "train_results.json").read_text())["train_runtime"]
    assert f"training time: {runtime / 60:.1f} minutes" in text
    assert "closed-set classification" in text   # what zero-shot on the embedded data measures


def test_push_goes_up_to_the_upload_call(trained_folder, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.setdefault("create", (repo_id, kw)))

    def fake_upload(self, folder_path, repo_id, commit_message, ignore_patterns):
        import fnmatch

        files = [str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded = [f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in ignore_patterns)]
        calls["upload"] = (repo_id, sorted(uploaded))

        class Info:
            commit_url = f"https://hub/{repo_id}/commit/1"

        return Info()

    monkeypatch.setattr(HfApi, "upload_folder", fake_upload)
    assert push_folder(trained_folder, "someone/tiny-lightclip") == "https://hub/someone/tiny-lightclip/commit/1"
    repo, files = calls["upload"]
    assert repo == "someone/tiny-lightclip"
    for needed in ("model.safetensors", "config.json", "modeling_lightclip.py", "configuration_lightclip.py",
                   "processing_lightclip.py", "processor_config.json", "tokenizer.json", "README.md"):
        assert needed in files, needed
    assert "objectives_lightclip.py" not in files  # training code stays in the package
    assert not [f for f in files if f.startswith("_") or f.endswith(".bin")]


def test_push_without_network_fails_with_one_clear_message(trained_folder):
    with pytest.raises(HubUploadError) as info:
        push_folder(trained_folder, "someone/tiny-lightclip")  # HF_HUB_OFFLINE=1 in the tests
    message = str(info.value)
    assert "could not upload" in message and "folder is complete" in message
    assert f"python -m modeling_lightclip.training.hub push {trained_folder} --hub_model_id someone/tiny-lightclip" in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_native_export_matches_lightclip(tokenizer, tmp_path, photo_paths):
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    model = LightCLIPModel(build_model_config(CLIP_SHAPED, tokenizer)).eval()
    processor = build_processor(32, tokenizer)
    export_clip(model, processor, tmp_path / "clip")
    clip = CLIPModel.from_pretrained(tmp_path / "clip").eval()
    clip_processor = CLIPProcessor.from_pretrained(tmp_path / "clip")
    texts = ["an astronaut in a suit", "a tabby cat on a blanket"]
    images = [Image.open(p) for p in photo_paths]
    inputs = processor(text=texts, images=images, padding=True, return_tensors="pt")
    native_inputs = clip_processor(text=texts, images=images, padding=True, return_tensors="pt")
    assert torch.equal(inputs["pixel_values"], native_inputs["pixel_values"])
    assert torch.equal(inputs["input_ids"], native_inputs["input_ids"])
    with torch.no_grad():
        ours = model(**inputs)
        theirs = clip(input_ids=native_inputs["input_ids"], attention_mask=native_inputs["attention_mask"],
                      pixel_values=native_inputs["pixel_values"])
    torch.testing.assert_close(theirs.image_embeds, ours.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.text_embeds, ours.text_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(theirs.logits_per_image, ours.logits_per_image, atol=1e-4, rtol=0)
    assert not list((tmp_path / "clip").glob("*.py")), "the native form carries no custom code"


def test_export_refuses_non_clip_towers(tiny_model, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="CLIP-shaped towers"):
        export_clip(tiny_model, build_processor(32, tokenizer), tmp_path)


def test_lora_merge_equals_the_peft_model(tiny_recipe, tokenizer, tmp_path):
    from modeling_lightclip.training.lora import apply_lora, merge_lora

    torch.manual_seed(0)
    base = LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer)).eval()
    original_keys = set(base.state_dict())
    peft_model = apply_lora(base, r=4, target_modules="query,value,visual_projection,text_projection")
    lora_params = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)
    assert not [n for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" not in n]
    with torch.no_grad():  # LoRA B starts at zero: make the adapters do something
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    batch = make_batch(tokenizer, batch_size=3)
    with torch.no_grad():
        adapted = peft_model(**batch)
    merged = merge_lora(peft_model).eval()
    assert type(merged) is LightCLIPModel
    with torch.no_grad():
        after = merged(**batch)
    torch.testing.assert_close(after.image_embeds, adapted.image_embeds, atol=1e-5, rtol=0)
    torch.testing.assert_close(after.text_embeds, adapted.text_embeds, atol=1e-5, rtol=0)
    merged.save_pretrained(tmp_path)
    reloaded = LightCLIPModel.from_pretrained(tmp_path).eval()
    assert set(reloaded.state_dict()) == original_keys
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).text_embeds, adapted.text_embeds, atol=1e-5, rtol=0)


def test_lora_fine_tuning_run_saves_a_plain_model(trained_folder, tmp_path):
    import train_lightclip
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    train_lightclip.main(["--recipe", "tiny", "--model_name_or_path", str(trained_folder), "--lora_r", "4",
                          "--learning_rate", "0.05", "--max_steps", "3", "--max_train_samples", "48",
                          "--max_eval_samples", "32", "--per_device_train_batch_size", "8", "--output_dir", str(out)])
    before, after = load_file(trained_folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert set(before) == set(after), "the merged checkpoint has exactly the original keys (no lora_ tensors)"
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.startswith(("text_model", "vision_model", "visual_projection", "text_projection"))
                           for k in changed)
    assert not (out / "adapter_config.json").exists()
    metrics = json.loads((out / "eval_results.json").read_text())
    assert "eval_zero_shot_top1" in metrics


@pytest.fixture()
def broken_saved_folders(tmp_path, tiny_model, tokenizer):
    """A saved model folder (weights, config, tokenizer, processor) with one part missing or cut short each."""
    import shutil

    from modeling_lightclip.training.preprocessing import build_processor

    good = tmp_path / "good"
    tiny_model.save_pretrained(good)
    build_processor(32, tokenizer).save_pretrained(good)
    processor_configs = [p.name for p in good.glob("*processor_config.json")]
    assert processor_configs and (good / "tokenizer.json").is_file()

    def variant(name, change):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        change(folder)
        return str(folder)

    def cut(file):
        def change(folder):
            (folder / file).write_bytes((folder / file).read_bytes()[: (folder / file).stat().st_size // 2])
        return change

    def remove(*files):
        return lambda folder: [(folder / f).unlink() for f in files]

    return str(good), {
        "no weights": (variant("no_weights", remove("model.safetensors")), "no weights"),
        "cut weights": (variant("cut_weights", cut("model.safetensors")), "model.safetensors cannot be read"),
        "no tokenizer": (variant("no_tokenizer", remove("tokenizer.json", "tokenizer_config.json")),
                         "no tokenizer files"),
        "cut tokenizer": (variant("cut_tokenizer", cut("tokenizer.json")), "tokenizer.json cannot be read"),
        "no processor": (variant("no_processor", remove(*processor_configs)), "no image processor"),
    }


def test_evaluation_and_export_of_a_broken_folder_end_in_one_message(broken_saved_folders, tmp_path, capsys):
    from modeling_lightclip.training import benchmark, hub, onnx_export

    good, broken = broken_saved_folders
    commands = {
        "hub card": lambda f: hub.main(["card", f]),
        "hub export": lambda f: hub.main(["export", f, "--out", str(tmp_path / "native")]),
        "onnx_export": lambda f: onnx_export.main([f, "--out", str(tmp_path / "onnx")]),
        "--model": lambda f: benchmark.main(["--model", f, "--validation_file", "unused.csv"]),
    }
    for case, (folder, message) in broken.items():
        for name, command in commands.items():
            try:
                code = command(folder)
            except SystemExit as stopped:
                code = stopped.code
            err = capsys.readouterr().err
            assert code == 2, (case, name, err[-600:])
            expected = f"^error: {re.escape(name)} {re.escape(folder)}: .*{message}"
            assert re.search(expected, err, re.M), (case, name, err)
        with pytest.raises(ValueError, match=f"^--model_name_or_path {re.escape(folder)}: .*{message}"):
            train_lightclip.main(["--do_train", "false", "--model_name_or_path", folder, "--max_eval_samples", "8",
                                  "--output_dir", str(tmp_path / "eval")])
    with pytest.raises(SystemExit) as stopped:  # export without --out
        hub.main(["export", good])
    assert stopped.value.code == 2 and "export needs --out" in capsys.readouterr().err
    hub.main(["card", good])  # the whole folder passes the check
    assert (Path(good) / "README.md").is_file()


def test_hub_command_takes_the_training_flags_for_the_hub(broken_saved_folders, monkeypatch, capsys):
    """`hub push` reads training's --hub_model_id / --hub_token / --hub_private_repo (--private kept as an alias),
    with training's help text, and hands them to the upload unchanged."""
    import dataclasses

    from transformers import TrainingArguments

    from modeling_lightclip.training import hub

    good = broken_saved_folders[0]
    pushed = []
    monkeypatch.setattr(hub, "push_folder", lambda *args: pushed.append(args) or "https://hub/x")
    hub.main(["push", good, "--hub_model_id", "me/tiny", "--hub_token", "secret", "--private"])
    hub.main(["push", good, "--hub_model_id", "me/tiny", "--hub_private_repo", "false"])
    assert pushed == [(good, "me/tiny", "secret", True), (good, "me/tiny", None, False)]
    with pytest.raises(SystemExit) as stopped:
        hub.main(["push", good])
    assert stopped.value.code == 2 and "push needs --hub_model_id" in capsys.readouterr().err
    training_help = {item.name: item.metadata["help"] for item in dataclasses.fields(TrainingArguments)}
    ours = {item.name: item.metadata["help"] for item in dataclasses.fields(hub.HubCommandArguments)}
    assert ours["hub_model_id"] == training_help["hub_model_id"] and ours["hub_token"] == training_help["hub_token"]
