"""Synthetic captions in a reinforced copy (`lightclip-reinforce --caption_model M --num_synthetic_captions N`),
written offline by a tiny random BLIP saved to a folder, and training on them (`--synthetic_caption_ratio`).

Oracles: each synthetic caption's stored teacher features computed afresh from its text; the collator's token ids
and teacher features matched against the row's own captions (real or synthetic) to find which one it trained on."""

import json
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from test_stored_augmentations import _source


class _HashTeacher:
    """Features that tell captions apart: a vector seeded by the caption's text (images: by their pixels)."""

    kind = "multimodal"

    def __init__(self):
        self.name, self.image_dim, self.text_dim = "hash", 4, 8

    def describe(self):
        return {"name": self.name, "kind": self.kind, "image_dim": self.image_dim, "text_dim": self.text_dim}

    @staticmethod
    def text_vector(text: str) -> torch.Tensor:
        generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
        return torch.nn.functional.normalize(torch.randn(8, generator=generator), dim=0)

    def image_features(self, images):
        return torch.nn.functional.normalize(torch.tensor([[float(np.asarray(i).mean()), 1.0, 2.0, 3.0]
                                                           for i in images]), dim=-1)

    def text_features(self, texts):
        return torch.stack([self.text_vector(t) for t in texts])


@pytest.fixture(scope="module")
def tiny_captioner(tmp_path_factory):
    """A random BLIP captioning model with its processor, saved to a folder (no download)."""
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    from modeling_lightclip.training.preprocessing import train_wordpiece_tokenizer

    tokenizer = train_wordpiece_tokenizer(["a photo of a cat on a mat", "an astronaut in a white suit",
                                           "a red car on the street"] * 4, vocab_size=120, model_max_length=32)
    text = {"vocab_size": len(tokenizer), "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
            "intermediate_size": 64, "max_position_embeddings": 32, "bos_token_id": tokenizer.cls_token_id,
            "eos_token_id": tokenizer.sep_token_id, "pad_token_id": tokenizer.pad_token_id,
            "sep_token_id": tokenizer.sep_token_id}
    vision = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
              "image_size": 32, "patch_size": 8}
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("blip")
    BlipForConditionalGeneration(BlipConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(
        folder)
    BlipProcessor(image_processor=BlipImageProcessor(size={"height": 32, "width": 32}),
                  tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


def _copy(tmp_path, captioner_folder, name="R", seed=3):
    from modeling_lightclip.training.reinforce import ImageCaptioner, reinforce

    captioner = ImageCaptioner(captioner_folder, num_captions=3, max_new_tokens=8, seed=seed)
    out = tmp_path / name
    reinforce({"train": _source(tmp_path / "images")}, out, [], shard_size=4, teachers=[_HashTeacher()],
              captioner=captioner)
    return out


def _rows(out: Path):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    return list(load_image_text_datasets(DataArguments(train_file=str(out)))["train"])


def test_synthetic_captions_are_stored_with_each_ones_teacher_features_and_rerun_alike(tmp_path, tiny_captioner):
    out = _copy(tmp_path, tiny_captioner)
    rows = _rows(out)
    assert len(rows) == 6
    for row in rows:
        synthetic = row["synthetic_captions"]
        assert 1 <= len(synthetic) <= 3 and all(isinstance(c, str) and c.strip() for c in synthetic)
        assert len(row["teacher0_synthetic_text"]) == len(synthetic)
        for caption, stored in zip(synthetic, row["teacher0_synthetic_text"]):
            np.testing.assert_allclose(stored, _HashTeacher.text_vector(caption).numpy(), atol=2e-3)
        np.testing.assert_allclose(row["teacher0_text"], _HashTeacher.text_vector(row["caption"]).numpy(), atol=2e-3)
    assert len({c for row in rows for c in row["synthetic_captions"]}) > 3  # sampled, not one fixed string
    meta = json.loads((out / "reinforced.json").read_text())
    assert meta["caption_model"]["num_captions"] == 3 and meta["teachers"][0]["columns"]["synthetic_text"]
    again = _rows(_copy(tmp_path, tiny_captioner, "again"))
    assert [r["synthetic_captions"] for r in again] == [r["synthetic_captions"] for r in rows]  # seeded
    other_seed = _rows(_copy(tmp_path, tiny_captioner, "other", seed=4))
    assert [r["synthetic_captions"] for r in other_seed] != [r["synthetic_captions"] for r in rows]


@pytest.mark.parametrize("ratio", [0.0, 1.0, 0.5])
def test_training_draws_synthetic_captions_at_the_ratio_with_their_features(tmp_path, tiny_captioner, tokenizer,
                                                                           ratio):
    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.preprocessing import build_processor

    out = _copy(tmp_path, tiny_captioner)
    rows = _rows(out)
    meta = json.loads((out / "reinforced.json").read_text())
    from modeling_lightclip import LightCLIPConfig

    config = LightCLIPConfig(relation_loss_weight=1.0, distill_loss_weight=1.0)  # teacher features and embeddings
    collator = ImageTextCollator(build_processor(32, tokenizer), model_config=config, teachers=meta["teachers"],
                                 synthetic_caption_ratio=ratio)
    kinds = set()
    for seed in range(4):
        collator.seed = seed
        batch = collator(rows)
        targets = batch["training_targets"]
        for j, row in enumerate(rows):
            ids = batch["input_ids"][j][batch["attention_mask"][j].bool()].tolist()
            options = [("real", row["caption"])] + [("synthetic", c) for c in row["synthetic_captions"]]
            trained = [(kind, c) for kind, c in options if tokenizer(c, truncation=True,
                                                                     max_length=32)["input_ids"] == ids]
            assert trained, (ids, options)
            kind, caption = trained[0]
            kinds.add(kind)
            for key in ("teacher_text_features", "teacher_text_embeds"):  # both routes read the drawn caption's
                torch.testing.assert_close(targets[key][j], _HashTeacher.text_vector(caption), atol=2e-3, rtol=0)
    assert kinds == {0.0: {"real"}, 1.0: {"synthetic"}, 0.5: {"real", "synthetic"}}[ratio]


def test_a_synthetic_caption_ratio_without_synthetic_captions_is_refused(tmp_path):
    import train_lightclip

    with pytest.raises(ValueError, match="--synthetic_caption_ratio trains on synthetic captions and this training "
                                         "data has none"):
        train_lightclip.main(["--recipe", "tiny", "--max_steps", "1", "--max_train_samples", "16",
                              "--synthetic_caption_ratio", "0.5", "--output_dir", str(tmp_path / "run")])


def test_a_round_two_copy_is_written_by_two_processes_resumed_and_streamed_into_training_by_two(tmp_path,
                                                                                                tiny_captioner):
    """4 stored views and 2 synthetic captions per image, from the local captioner, with an OpenCLIP teacher:
    written by two processes, a shard lost to a kill written again by the rerun (no row lost or doubled), then
    trained from, streamed, by two processes on real and synthetic captions with distillation."""
    import os
    import subprocess
    import sys

    pytest.importorskip("open_clip")
    from test_reinforce import WORKER, _open_clip_teacher, _pairs

    from conftest import REPO

    csv = _pairs(tmp_path / "data", 40)
    teacher = _open_clip_teacher(tmp_path / "openclip")
    out, run = tmp_path / "R", tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": str(REPO)}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]
    flags = ["--shard_size", "10", "--num_augmentations", "4", "--caption_model", tiny_captioner,
             "--num_synthetic_captions", "2", "--caption_max_new_tokens", "8", "--teacher",
             f"open_clip:local-dir:{teacher}"]
    proc = subprocess.run(launch + ["reinforce", str(csv), str(out), *flags], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    summaries = [json.loads(p.read_text()) for p in sorted((out / "train").glob("part-*.json"))]
    assert [s["rank"] for s in summaries] == [0, 1, 0, 1]
    # as a kill leaves it: shard 1's parquet only half-way (.tmp), no metadata yet
    (out / "train" / "part-00001.parquet").rename(out / "train" / "part-00001.parquet.tmp")
    (out / "reinforced.json").unlink()
    kept = {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("part-*.parquet")}
    proc = subprocess.run(launch + ["reinforce", str(csv), str(out), *flags], env=env, capture_output=True,
                          text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert {p.name: p.stat().st_mtime_ns for p in (out / "train").glob("part-*.parquet") if p.name in kept} == kept
    rows = _rows(out)
    assert sorted(r["source_row"] for r in rows) == list(range(40))  # no row lost or doubled
    assert all(len(r["augmentations"]) == 4 and len(r["teacher0_image"]) == 4 and 1 <= len(r["synthetic_captions"])
               <= 2 for r in rows)
    meta = json.loads((out / "reinforced.json").read_text())
    assert meta["teachers"][0]["name"].startswith("open_clip:") and meta["augmentation"]["num_augmentations"] == 4

    proc = subprocess.run(launch + ["train", str(out), str(run), str(tmp_path / "seen"), "--max_steps", "5",
                                    "--synthetic_caption_ratio", "0.5", "--distill_loss_weight", "1"],
                          env=env, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-5000:]
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["global_step"] == 5 and all(h["loss_distill"] > 0 for h in state["log_history"] if "loss" in h)
