"""Robustness, round 2: messy files a real user has, each a counted skip or one clear start-up error.

Every input here is generated in the test; expectations come from how the file was built (which rows were broken,
which line they are on), never from running the code under test first.
"""

import codecs
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CAPTIONS, FIXTURES


def _image_files(folder: Path, n: int) -> list[str]:
    photo = Image.open(FIXTURES / "astronaut.jpg").convert("RGB").resize((40, 40))
    names = []
    for i in range(n):
        name = f"img{i}.png"
        Image.fromarray(np.roll(np.asarray(photo), 3 * i, axis=1)).save(folder / name)
        names.append(name)
    return names


def _tiny(out: Path, *flags) -> list[str]:
    return ["--recipe", "tiny", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "16",
            "--max_steps", "2", "--logging_steps", "1", "--dataloader_num_workers", "0", "--output_dir", str(out),
            *flags]


# ------------------------------------------------------------------------------------------ files that load row by row


def test_csv_with_a_latin1_row_a_ragged_row_and_an_unquoted_comma(tmp_path):
    from modeling_lightclip.training.tables import read_table

    lines = [b"image,caption,label",                        # line 1
             b"a.png,a plain caption,0",                    # 2
             "b.png,un caf\u00e9 cr\u00e8me,1".encode("cp1252"),  # 3: latin-1 bytes in a utf-8 file
             b"c.png,a ragged row",                         # 4: a field short
             b"d.png,a cat, sitting on a mat,2",            # 5: unquoted comma
             b"",                                           # 6: blank, not a row
             b'e.png,"a quoted, comma\nand a newline",3',   # 7-8: one record
             b"f.png,the last row,4"]                       # 9
    path = tmp_path / "messy.csv"
    path.write_bytes(b"\r\n".join(lines) + b"\r\n")
    columns, report = read_table(path, text_columns=("image", "caption"))
    assert columns["image"] == ["a.png", "e.png", "f.png"]
    assert columns["caption"][1] == "a quoted, comma\nand a newline"
    assert columns["label"] == [0, 3, 4]                    # ints, not strings
    assert dict(report.skipped) == {"undecodable_text": 1, "malformed_row": 2}
    assert report.lines == {"undecodable_text": [3], "malformed_row": [4, 5]}
    # the fix the warning names: the right encoding keeps the row
    columns, report = read_table(path, encoding="cp1252", text_columns=("image", "caption"))
    assert "un caf\u00e9 cr\u00e8me" in columns["caption"] and report.skipped["undecodable_text"] == 0


def test_tsv_by_extension_utf16_excel_export_and_json_lines(tmp_path):
    from modeling_lightclip.training.tables import read_table

    semicolons = tmp_path / "excel_de.csv"   # Excel in a locale with a decimal comma
    semicolons.write_text("image;caption\na.png;ein Foto, mit Komma\n", encoding="utf-8")
    assert read_table(semicolons)[0] == {"image": ["a.png"], "caption": ["ein Foto, mit Komma"]}
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("image\tcaption\na.png\ta caption, with a comma\n", encoding="utf-8")
    columns, _ = read_table(tsv)
    assert columns == {"image": ["a.png"], "caption": ["a caption, with a comma"]}
    excel = tmp_path / "unicode_text.tsv"   # Excel's "Unicode text": utf-16 with a byte-order mark, tab-separated
    excel.write_bytes(codecs.BOM_UTF16_LE + "image\tcaption\nb.png\tna\u00efve caf\u00e9\n".encode("utf-16-le"))
    assert read_table(excel)[0]["caption"] == ["na\u00efve caf\u00e9"]
    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text('{"image": "a.png", "caption": "one"}\n{"image": "b.png", "caption": \n'
                     '[1, 2]\n{"image": "c.png", "caption": 1984}\n', encoding="utf-8")
    columns, report = read_table(jsonl, text_columns=("image", "caption"))
    assert columns["caption"] == ["one", "1984"]           # a number where a caption goes is text
    assert report.lines == {"malformed_json": [2, 3]}


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"),
    (b"image,caption\n", "has a header but no rows"),
    (b"image,caption\n" + "x.png,caf\u00e9\n".encode("cp1252"), "--file_encoding"),
])
def test_files_that_cannot_train_are_one_clear_error(tmp_path, content, message):
    import train_lightclip

    path = tmp_path / "train.csv"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        train_lightclip.main(_tiny(tmp_path / "out", "--train_file", str(path)))


def test_a_messy_csv_trains_and_reports_its_skipped_rows(tmp_path):
    import train_lightclip

    names = _image_files(tmp_path, 12)
    rows = [f"{name},{caption}".encode() for name, caption in zip(names, CAPTIONS * 2)]
    rows.insert(3, "img0.png,une l\u00e9gende".encode("cp1252"))
    rows.insert(6, b"img1.png,too,many,fields")
    (tmp_path / "train.csv").write_bytes(b"image,caption\n" + b"\n".join(rows) + b"\n")
    out = tmp_path / "run"
    train_lightclip.main(_tiny(out, "--train_file", str(tmp_path / "train.csv"), "--validation_file",
                               str(tmp_path / "train.csv"), "--label_column", "none"))
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert train["train_skipped_undecodable_text"] == 1 and train["train_skipped_malformed_row"] == 1
    assert evaluation["eval_skipped_undecodable_text"] == 1 and evaluation["eval_num_samples"] == 12


def test_imagefolder_images_without_a_metadata_row_are_counted(tmp_path):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    folder = tmp_path / "train"
    folder.mkdir()
    names = _image_files(folder, 5)
    (folder / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{n},a photo {i}\n"
                                                                         for i, n in enumerate(names[:3])))
    splits = load_image_text_datasets(DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path)))
    assert len(splits["train"]) == 3
    assert splits.file_skips["train"]["image_without_metadata"] == 2


# ------------------------------------------------------------------------------------------ images


def _png(image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_a_thin_strip_is_refused_from_its_header(monkeypatch):
    from modeling_lightclip.training import data

    strip = _png(Image.new("L", (300_000, 1)))
    decoded = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or original(self))
    with pytest.raises(data.ImageRejected) as err:
        data.load_image(strip)
    assert err.value.reason == "extreme_aspect_ratio" and decoded == []   # refused before any pixel is decoded
    with pytest.raises(data.ImageRejected) as err:
        data.load_image(_png(Image.new("L", (1_200, 100))), max_side=1_000)
    assert err.value.reason == "too_large"


def test_exif_orientation_and_non_finite_pixels(tokenizer):
    from modeling_lightclip.training.data import ImageTextCollator, load_image
    from modeling_lightclip.training.preprocessing import build_processor

    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    wide.paste((0, 0, 255), (0, 0, 10, 20))                      # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6                                              # "rotate 90 degrees clockwise to view"
    upright = load_image(_png(wide, "JPEG", exif=exif))
    assert upright.size == (20, 40)
    assert upright.getpixel((10, 2))[2] > 200                     # the left edge is now the top
    nan_tiff = Image.fromarray(np.array([[1.0, np.nan], [0.5, 0.2]], dtype=np.float32), mode="F")
    ok_tiff = Image.fromarray(np.array([[1.0, 0.0], [0.5, 0.2]], dtype=np.float32), mode="F")
    collator = ImageTextCollator(build_processor(32, tokenizer), train=False)
    batch = collator([{"image": _png(nan_tiff, "TIFF"), "caption": "nan"},
                      {"image": _png(ok_tiff, "TIFF"), "caption": "fine"},
                      {"image": _png(Image.new("L", (5000, 10))), "caption": "a strip"}])
    assert batch["pixel_values"].shape[0] == 1
    assert batch["skipped"] == {"undecodable_image": 1, "extreme_aspect_ratio": 1, "repaired_high_bit_depth": 1}


# ------------------------------------------------------------------------------------------ captions and empty runs


def test_invisible_and_special_token_captions_are_empty_and_special_strings_are_text(tokenizer):
    from modeling_lightclip.training.data import ImageTextCollator, clean_caption
    from modeling_lightclip.training.preprocessing import build_processor

    specials = frozenset(tokenizer.all_special_tokens)
    for caption in ["\x00\x07\x1b", "\u200b\u200c\u2060", "\ufeff", "[PAD] [PAD]", " [CLS]\t[SEP] "]:
        assert clean_caption(caption, specials) == (None, "empty_caption"), repr(caption)
    assert clean_caption("a\u200bcat\x00 on\ta mat", specials) == ("acat on a mat", None)
    assert clean_caption(1984, specials) == ("1984", None) and clean_caption(float("nan")) == (None, "missing_caption")
    collator = ImageTextCollator(build_processor(32, tokenizer), train=False)
    photo = _png(Image.open(FIXTURES / "astronaut.jpg"))
    batch = collator([{"image": photo, "caption": "a [MASK] in a [PAD] white suit"},
                      {"image": photo, "caption": "\u200b [PAD] "}])
    assert batch["skipped"] == {"empty_caption": 1}
    ids = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert tokenizer.mask_token_id not in ids and ids.count(tokenizer.pad_token_id) == 0


def test_runs_that_would_train_on_nothing_refuse_to_start(tmp_path):
    import train_lightclip

    names = _image_files(tmp_path, 6)
    few = tmp_path / "few.csv"
    few.write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c in zip(names, CAPTIONS)))
    with pytest.raises(ValueError, match="6 usable samples, fewer than one global batch"):
        train_lightclip.main(_tiny(tmp_path / "a", "--train_file", str(few), "--per_device_train_batch_size", "8"))
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n" + "".join(f"{n},\u200b[PAD] [PAD]\u200b\n" for n in names) * 3,
                     encoding="utf-8")
    with pytest.raises(ValueError, match="no usable caption .*18 empty_caption"):
        train_lightclip.main(_tiny(tmp_path / "b", "--train_file", str(empty)))
    with pytest.raises(ValueError, match="--do_train false evaluates an existing model"):
        train_lightclip.main(_tiny(tmp_path / "c", "--do_train", "false"))
    # images bad in the first rows only: the start-up probe looks across the file, the run trains
    mostly_good = tmp_path / "mostly_good.csv"
    rows = [f"missing{i}.png,a missing image" for i in range(8)] + [f"{n},{c}" for n, c in zip(names * 4, CAPTIONS * 3)]
    mostly_good.write_text("image,caption\n" + "\n".join(rows) + "\n")
    train_lightclip.main(_tiny(tmp_path / "d", "--train_file", str(mostly_good), "--do_eval", "false"))


def test_numeric_captions_train(tmp_path):
    import train_lightclip

    names = _image_files(tmp_path, 8)
    path = tmp_path / "numbers.csv"
    path.write_text("image,caption\n" + "".join(f"{n},{1990 + i}\n" for i, n in enumerate(names)))
    out = tmp_path / "run"
    train_lightclip.main(_tiny(out, "--train_file", str(path), "--do_eval", "false"))
    train = json.loads((out / "train_results.json").read_text())
    assert not any(k.startswith("train_skipped_") for k in train)
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(x > 0 for x in losses)


def test_the_command_line_prints_one_message_and_exits_2(tmp_path, capsys):
    import train_lightclip

    assert train_lightclip.cli(_tiny(tmp_path / "a", "--soft_label_temperature", "0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: soft_label_temperature=0.0 (--soft_label_temperature)") and "Traceback" not in err


# ------------------------------------------------------------------------------------------ labels and templates


def _labelled_csv(folder: Path, labels: list, name: str = "val.csv") -> Path:
    names = _image_files(folder, len(labels))
    path = folder / name
    path.write_text("image,caption,label\n" + "".join(f"{n},{CAPTIONS[i % 8]},{label}\n"
                                                     for i, (n, label) in enumerate(zip(names, labels))))
    return path


def test_string_labels_missing_labels_and_out_of_range_ids(tmp_path):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets, prepare_zero_shot_labels

    def prepared(labels, class_names=None):
        path = _labelled_csv(tmp_path, labels)
        args = DataArguments(validation_file=str(path), class_names=class_names)
        return prepare_zero_shot_labels(load_image_text_datasets(args)["validation"], args)

    dataset, names = prepared(["dog", "cat", "", "Dog"])              # names from the strings themselves
    assert names == ["cat", "dog"] and dataset["label"] == [1, 0, -1, 1]
    dataset, names = prepared(["cat", "dog", "", " DOG "], class_names="dog,cat")
    assert names == ["dog", "cat"] and dataset["label"] == [1, 0, -1, 0]
    with pytest.raises(ValueError, match="name no class \\(bird\\)"):
        prepared(["cat", "bird"], class_names="dog,cat")
    dataset, _ = prepared([0, 1, -1, ""], class_names="dog,cat")
    assert dataset["label"] == [0, 1, -1, -1]
    with pytest.raises(ValueError, match="class ids \\[2\\] outside the 2 class names"):
        prepared([0, 2], class_names="dog,cat")
    with pytest.raises(ValueError, match="class ids \\[-3\\]"):
        prepared([0, -3], class_names="dog,cat")


@pytest.mark.parametrize("template", ["a photo of a {}}.", "a {} and a {}", "a {name}", "a {0} {1}", "no slot"])
def test_templates_are_checked_by_formatting_them(template):
    from modeling_lightclip.training.data import DataArguments, zero_shot_templates

    with pytest.raises(ValueError, match="zero-shot template"):
        zero_shot_templates(DataArguments(zero_shot_templates=f"a photo of a {{}}.|{template}"))


def test_evaluation_scores_every_row_with_string_labels(tmp_path):
    import train_lightclip

    labels = ["cat", "dog"] * 9 + ["", "bird"]                  # 20 rows, eval batch 16: a partial last batch
    path = _labelled_csv(tmp_path, labels)
    out = tmp_path / "run"
    train_lightclip.main(_tiny(out, "--train_file", str(path), "--validation_file", str(path),
                               "--zero_shot_templates", "a photo of a {}."))
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_num_samples"] == 20 and math.isfinite(evaluation["eval_loss"])
    assert evaluation["eval_zero_shot_unlabelled"] == 1 and 0 <= evaluation["eval_zero_shot_top1"] <= 1


def test_an_eval_set_smaller_than_one_batch_has_a_loss(tmp_path):
    import train_lightclip

    path = _labelled_csv(tmp_path, [0, 1, 0, 1, 0, 1])
    out = tmp_path / "run"
    train_lightclip.main(_tiny(out, "--train_file", str(_labelled_csv(tmp_path, [0] * 8, "train.csv")), "--validation_file",
                               str(path), "--class_names", "a,b"))
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_num_samples"] == 6 and math.isfinite(evaluation["eval_loss"])


# ------------------------------------------------------------------------------------------ counts that tell the truth


def test_counts_survive_workers_and_exclude_prefetched_batches(tmp_path, monkeypatch):
    import train_lightclip

    names = _image_files(tmp_path, 16)
    rows = [f"{n},{CAPTIONS[i % 8]}" for i, n in enumerate(names)]
    bad = [f"gone{i}.png,a missing file" for i in range(8)]
    # batches of 4 in file order (a stream is not shuffled): each of the 3 trained batches holds one missing file;
    # the 5 other missing files come after, in batches the loader's workers prefetch but the run never trains on
    order = []
    for i in range(3):
        order += [bad[i]] + rows[3 * i: 3 * i + 3]
    order += rows[9:] + bad[3:]
    path = tmp_path / "train.csv"
    path.write_text("image,caption\n" + "\n".join(order) + "\n")
    out = tmp_path / "run"
    train_lightclip.main(_tiny(out, "--train_file", str(path), "--validation_file", str(path), "--label_column",
                               "none", "--streaming", "--max_steps", "3", "--dataloader_num_workers", "2"))
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert train["train_skipped_missing_file"] == 3             # 3 trained batches, not the ones prefetched after
    assert evaluation["eval_skipped_samples"] == 8 and evaluation["eval_num_samples"] == 16


def test_nan_losses_are_logged_as_nan_and_stop_the_run(tmp_path, monkeypatch, capsys):
    import train_lightclip
    from modeling_lightclip.modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.stops import TrainingStopped

    original = LightCLIPModel.forward

    def diverged(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.loss is not None:
            out.loss = out.loss * float("nan")
            out["loss"] = out.loss
        return out

    monkeypatch.setattr(LightCLIPModel, "forward", diverged)
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match="NaN or infinite for 3 steps in a row"):
        train_lightclip.main(_tiny(out, "--max_train_samples", "64", "--max_steps", "10", "--stop_after_bad_steps",
                                   "3", "--do_eval", "false"))
    logged = capsys.readouterr()
    assert "'loss': 'nan'" in logged.out + logged.err       # not the Trainer's filtered running average


# ------------------------------------------------------------------------------------------ flags refused at start-up


@pytest.mark.parametrize("flags, flag", [
    (["--soft_label_temperature", "0"], "--soft_label_temperature"),
    (["--token_temperature", "-1"], "--token_temperature"),
    (["--token_temperature", "0"], "--token_temperature"),
    (["--logit_scale_init_value", "inf"], "--logit_scale_init_value"),
    (["--logit_scale_max", "-5"], "--logit_scale_max"),
    (["--vision_token_stage", "9"], "--vision_token_stage"),
    (["--fusion_vision_stages", "7", "9"], "--fusion_vision_stages"),
    (["--image_size", "0"], "--image_size"),
    (["--max_caption_length", "1"], "--max_caption_length"),
    (["--max_caption_length", "100"], "--max_caption_length"),
])
def test_flags_that_cannot_work_are_refused_naming_the_flag(tmp_path, flags, flag):
    import train_lightclip

    with pytest.raises(ValueError, match=flag):
        train_lightclip.main(_tiny(tmp_path / "out", "--max_train_samples", "16", *flags))


def test_a_vit_recipe_at_another_size_builds_its_tower_for_it(tokenizer):
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config, load_recipe

    config = build_model_config(load_recipe("vit_xs")["model"], tokenizer, image_size=32)
    assert config.vision_config.image_size == 32
    model = LightCLIPModel(config)
    assert model.get_image_features(pixel_values=torch.randn(1, 3, 32, 32)).pooler_output.shape == (1, 256)
    with pytest.raises(ValueError, match="smaller than one 16-pixel patch"):
        build_model_config(load_recipe("vit_xs")["model"], tokenizer, image_size=8)


def test_a_tokenizer_without_a_pad_token_is_refused(tmp_path, tokenizer):
    import copy

    import train_lightclip

    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    no_pad.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match="has no pad token"):
        train_lightclip.main(_tiny(tmp_path / "out", "--tokenizer_name", str(tmp_path / "tok")))


# ------------------------------------------------------------------------------------------ checkpoints and disks


def test_latest_skips_incomplete_checkpoints_and_says_why(tmp_path, caplog):
    import train_lightclip
    from modeling_lightclip.training.checkpoints import checkpoint_problem, latest_complete_checkpoint

    out = tmp_path / "run"
    train_lightclip.main(_tiny(out, "--max_train_samples", "64", "--max_steps", "2", "--save_strategy", "steps",
                               "--save_steps", "1", "--do_eval", "false"))
    good, newest = out / "checkpoint-1", out / "checkpoint-2"
    assert checkpoint_problem(good) is None and latest_complete_checkpoint(out) == str(newest)
    for name, damage, reason in [("model.safetensors", "truncate", "model.safetensors is truncated"),
                                 ("optimizer.pt", "truncate", "optimizer.pt is truncated"),
                                 ("rng_state.pth", "truncate", "rng_state.pth is"),
                                 ("scheduler.pt", "delete", "scheduler.pt is missing"),
                                 ("trainer_state.json", "truncate", "trainer_state.json is truncated")]:
        broken = tmp_path / f"broken-{name}" / "checkpoint-3"
        shutil.copytree(newest, broken)
        target = broken / name
        if damage == "delete":
            target.unlink()
        else:
            target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
        assert reason in checkpoint_problem(broken), name
        shutil.copytree(good, broken.parent / "checkpoint-1")
        caplog.clear()
        with caplog.at_level("WARNING"):
            assert latest_complete_checkpoint(broken.parent) == str(broken.parent / "checkpoint-1")
        assert f"skipping {broken}: {reason}" in caplog.text
    only_model = tmp_path / "only_model"
    shutil.copytree(newest, only_model / "checkpoint-2")
    (only_model / "checkpoint-2" / "optimizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match="checkpoint-2: optimizer.pt is missing.*--save_only_model"):
        train_lightclip.main(_tiny(only_model, "--resume_from_checkpoint", "latest"))
    with pytest.raises(ValueError, match="cannot resume, trainer_state.json is truncated"):
        train_lightclip.main(_tiny(tmp_path / "again", "--resume_from_checkpoint",
                                   str(tmp_path / "broken-trainer_state.json" / "checkpoint-3")))


def test_a_full_disk_names_the_folder(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    from modeling_lightclip.training.stops import TrainingStopped, writing_to

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30, 0))
    with pytest.raises(TrainingStopped, match=f"no space left on device while writing to {tmp_path} \\(0 MiB free"):
        with writing_to(tmp_path):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                               "basic_ios::clear: iostream error")
    with pytest.raises(TrainingStopped, match="no space left"):
        with writing_to(tmp_path):
            raise OSError(28, "No space left on device")
    with pytest.raises(RuntimeError, match="something else"):   # other errors pass unchanged
        with writing_to(tmp_path):
            raise RuntimeError("something else")


def test_a_size_a_vit_tower_was_not_built_for_is_one_message(tokenizer):
    from modeling_lightclip import LightCLIPConfig, LightCLIPModel
    from modeling_lightclip.training.recipes import load_recipe

    fields = dict(load_recipe("vit_xs")["model"], image_size=64)   # tower config still says 224
    with pytest.raises(ValueError, match="image_size=64 \\(--image_size\\) does not fit the clip_vision_model"):
        LightCLIPModel(LightCLIPConfig(**fields))


def test_the_csv_builder_with_a_data_dir_reads_row_by_row_too(tmp_path):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    names = _image_files(tmp_path, 4)
    (tmp_path / "train.csv").write_text("image,caption\n" + "".join(f"{n},photo {i}\n" for i, n in enumerate(names))
                                        + "img0.png,one,field too many\n")
    (tmp_path / "validation.csv").write_bytes(b"image,caption\nimg1.png,caf\xe9\nimg2.png,ok\n")
    splits = load_image_text_datasets(DataArguments(dataset_name="csv", data_dir=str(tmp_path)))
    assert len(splits["train"]) == 4 and len(splits["validation"]) == 1
    assert splits.file_skips == {"train": {"malformed_row": 1}, "validation": {"undecodable_text": 1}}
    assert splits["train"][0]["image"] == str(tmp_path / "img0.png")   # relative to the file's folder


def test_windows_relative_paths_resolve(tmp_path):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    (tmp_path / "images").mkdir()
    names = _image_files(tmp_path / "images", 2)
    path = tmp_path / "train.csv"
    path.write_text("image,caption\n" + "".join(f"images\\{n},photo {i}\n" for i, n in enumerate(names)))
    dataset = load_image_text_datasets(DataArguments(train_file=str(path)))["train"]
    assert dataset["image"] == [str(tmp_path / "images" / n) for n in names]


def test_a_full_disk_during_a_checkpoint_stops_the_run_with_the_message(tmp_path, monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    import train_lightclip
    from modeling_lightclip.training.stops import TrainingStopped

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 832 vs 640: "
                           "basic_ios::clear: iostream error")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full)          # the Trainer writes optimizer.pt / rng_state.pth with it
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(2**30, 2**30, 0))
    out = tmp_path / "run"
    with pytest.raises(TrainingStopped, match=f"no space left on device while writing to {out}"):
        train_lightclip.main(_tiny(out, "--max_train_samples", "32", "--save_strategy", "steps", "--save_steps", "1",
                                   "--do_eval", "false"))
