"""Stored augmentations in a reinforced copy (`lightclip-reinforce --num_augmentations K`): each image's K views
drawn from the training augmentation, stored as parameters with the teachers' features of each view, re-applied
exactly in training.

Oracles: the pixels the teacher was handed (recorded by a stand-in teacher) against the stored parameters re-applied
to the source image; the stand-in's features computed afresh from each view; the collator's pixels matched against
each stored view to find which one it drew."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import FIXTURES


class _RecordingTeacher:
    """Hands back features computed from the pixels it is given, and keeps every view it saw."""

    kind = "multimodal"

    def __init__(self):
        self.name, self.image_dim, self.text_dim, self.seen = "recording", 5, 3, []

    def describe(self):
        return {"name": self.name, "kind": self.kind, "image_dim": self.image_dim, "text_dim": self.text_dim}

    @staticmethod
    def feature(image):
        pixels = np.asarray(image, dtype=np.float32)
        return torch.nn.functional.normalize(torch.tensor([*pixels.mean(axis=(0, 1)) / 255.0, image.size[0] / 40,
                                                           image.size[1] / 40]), dim=0)

    def image_features(self, images):
        self.seen.extend(np.asarray(image).copy() for image in images)
        return torch.stack([self.feature(image) for image in images])

    def text_features(self, texts):
        return torch.nn.functional.normalize(torch.tensor([[float(len(t)), 1.0, 1.0] for t in texts]), dim=-1)


def _source(folder: Path, n: int = 6):
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    photo = np.asarray(Image.open(FIXTURES / "astronaut.jpg").convert("RGB").resize((40, 48)))
    paths = []
    for i in range(n):
        Image.fromarray(np.roll(photo, 5 * i, axis=1)).save(folder / f"img{i}.png")
        paths.append(str(folder / f"img{i}.png"))
    return Dataset.from_dict({"image": paths, "caption": [f"a photo number {i}" for i in range(n)]})


@pytest.fixture()
def copy_with_views(tmp_path):
    from modeling_lightclip.training.reinforce import StoredAugmentation, reinforce

    source = _source(tmp_path / "images")
    teacher = _RecordingTeacher()
    out = tmp_path / "R"
    reinforce({"train": source, "validation": source}, out, [], shard_size=4, teachers=[teacher],
              augmentation=StoredAugmentation(num_augmentations=3, random_resized_crop_scale=0.5, seed=7))
    return out, source, teacher


def _rows(out: Path, split: str = "train"):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    return list(load_image_text_datasets(DataArguments(train_file=str(out)))[split])


def test_the_teacher_saw_exactly_the_stored_views_and_its_features_of_each_are_stored(copy_with_views):
    from modeling_lightclip.training.data import apply_augmentation

    out, source, teacher = copy_with_views
    rows = _rows(out)
    assert [row["source_row"] for row in rows] == list(range(6))
    seen = iter(teacher.seen)
    for row in rows:
        image = Image.open(source[row["source_row"]]["image"]).convert("RGB")
        assert len(row["augmentations"]) == 3 and len(row["teacher0_image"]) == 3
        for params, stored in zip(row["augmentations"], row["teacher0_image"]):
            view = apply_augmentation(image, params)
            np.testing.assert_array_equal(np.asarray(view), next(seen))  # pixel for pixel, before any resizing
            np.testing.assert_allclose(stored, _RecordingTeacher.feature(view).numpy(), atol=2e-3)
            left, top, right, bottom, flip = params  # a draw of the training augmentation
            area = (right - left) * (bottom - top)
            assert 0.5 - 0.05 <= area <= 1.0 and flip in (0.0, 1.0)
            assert 3 / 4 - 0.1 <= (right - left) * 40 / ((bottom - top) * 48) <= 4 / 3 + 0.1 or area == 1.0
    assert next(seen, None) is None
    assert len({tuple(map(tuple, row["augmentations"])) for row in rows}) == 6  # each image its own draws
    meta = json.loads((out / "reinforced.json").read_text())
    assert meta["augmentation"]["num_augmentations"] == 3 and meta["teachers"][0]["image_dim"] == 5
    assert _rows(out, "validation")[0].get("augmentations") is None  # evaluation sees whole images


def test_training_reapplies_the_drawn_view_and_reads_that_views_features(copy_with_views, tokenizer):
    from modeling_lightclip.training.data import ImageTextCollator, apply_augmentation
    from modeling_lightclip.training.preprocessing import build_processor

    out, source, _ = copy_with_views
    rows = _rows(out)
    processor = build_processor(32, tokenizer)
    meta = json.loads((out / "reinforced.json").read_text())
    from modeling_lightclip import LightCLIPConfig

    config = LightCLIPConfig(relation_loss_weight=1.0)  # reads the teachers' features
    collator = ImageTextCollator(processor, model_config=config, teachers=meta["teachers"])
    drawn = set()
    for seed in range(3):
        collator.seed = seed
        batch = collator(rows)
        for j, row in enumerate(rows):
            image = Image.open(source[row["source_row"]]["image"]).convert("RGB")
            candidates = [processor.image_processor(apply_augmentation(image, p), return_tensors="pt")
                          ["pixel_values"][0] for p in row["augmentations"]]
            matches = [k for k, pixels in enumerate(candidates) if torch.allclose(pixels, batch["pixel_values"][j])]
            assert len(matches) == 1, (seed, j, matches)  # the student sees one stored view, exactly
            k = matches[0]
            drawn.add(k)
            stored = torch.tensor(row["teacher0_image"][k], dtype=torch.float32)
            expected = torch.nn.functional.normalize(stored, dim=0)
            torch.testing.assert_close(batch["training_targets"]["teacher_image_features"][j], expected)
    assert drawn == {0, 1, 2}


def test_a_rerun_draws_the_same_views_and_no_views_keeps_todays_copy(copy_with_views, tmp_path):
    from modeling_lightclip.training.reinforce import StoredAugmentation, reinforce

    out, source, _ = copy_with_views
    again = tmp_path / "again"
    reinforce({"train": source}, again, [], shard_size=4, teachers=[_RecordingTeacher()],
              augmentation=StoredAugmentation(num_augmentations=3, random_resized_crop_scale=0.5, seed=7))
    assert [r["augmentations"] for r in _rows(again)] == [r["augmentations"] for r in _rows(out)]
    plain = tmp_path / "plain"
    reinforce({"train": source}, plain, [], shard_size=4, teachers=[_RecordingTeacher()])
    row = _rows(plain)[0]
    assert "augmentations" not in row and len(row["teacher0_image"]) == 5
    assert json.loads((plain / "reinforced.json").read_text())["augmentation"] is None


def test_views_flags_that_cannot_work_are_refused(tmp_path, capsys):
    from modeling_lightclip.training.reinforce import main

    for flags, message in ((["--num_augmentations", "-1"], "--num_augmentations -1"),
                           (["--num_augmentations", "2", "--random_resized_crop_scale", "0"],
                            "--random_resized_crop_scale 0.0")):
        with pytest.raises(SystemExit):
            main(["--out", str(tmp_path / "R"), *flags])
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("flags, refused", [
    ([], True),                                                          # training's default crop (0.8) differs
    (["--random_resized_crop_scale", "0.5", "--horizontal_flip", "false"], True),    # flips differ
    (["--random_resized_crop_scale", "0.5"], False),                     # the copy's augmentation: trains
])
def test_augmentation_flags_that_a_copy_with_views_would_ignore_are_refused(copy_with_views, tmp_path, flags,
                                                                              refused):
    """Training re-applies a copy's stored views, so augmentation flags other than the copy's would be ignored:
    refused with one message naming the copy's values; the copy's values train."""
    import train_lightclip

    out, _, _ = copy_with_views
    argv = ["--recipe", "tiny", "--train_file", str(out), "--max_steps", "1", "--per_device_train_batch_size", "3",
            "--soft_label_mode", "none", "--token_loss_weight", "0", "--mlm_loss_weight", "0",
            "--relation_loss_weight", "0", "--ping_nn_loss_weight", "0", "--ping_xnn_loss_weight", "0",
            "--do_eval", "false", "--save_strategy", "no", "--output_dir", str(tmp_path / "run"), *flags]
    if refused:
        with pytest.raises(ValueError, match=r"stores 3 views per image drawn with --random_resized_crop_scale 0\.5 "
                                             r"and horizontal flips on.*would not apply"):
            train_lightclip.main(argv)
    else:
        assert train_lightclip.main(argv).state.global_step == 1
