"""Data: messy files, images and captions a real user has, each a counted skip or one clear start-up error;
bad samples skipped and counted once under several processes and streaming.

Every input is generated in the test; expectations come from how it was built (which rows or lines are broken,
which bytes were written), never from running the code under test first.
"""

import codecs
import io
import json
import math
from pathlib import Path
import numpy as np
import pytest
import torch
from PIL import Image
from conftest import CAPTIONS, FIXTURES, REPO, image_files, run_cli, saved_tokenizer, tiny_train_argv
import os
import subprocess
import sys
import re
import train_lightclip


def _dirty_parquet(folder: Path) -> tuple[Path, dict]:
    """48 rows: 32 good (several image modes, a 1x1 image, duplicates), 16 bad of known kinds."""
    from datasets import Dataset, Features, Image as ImageFeature, Value

    photo = Image.open(FIXTURES / "astronaut.jpg").convert("RGB")
    cat = Image.open(FIXTURES / "chelsea_cat.jpg").convert("RGB")
    rgba = cat.convert("RGBA")
    palette = cat.convert("P")
    palette.info["transparency"] = 0
    sixteen = Image.fromarray((torch.rand(20, 20) * 60000).to(torch.int32).numpy().astype("uint16"))
    assert sixteen.mode.startswith("I;16")
    good = [
        (_png(photo), "an astronaut in a white suit"), (_png(cat), "a tabby cat"),
        (_png(photo.convert("L")), "a grey astronaut"), (_png(cat.convert("LA")), "a grey cat with alpha"),
        (_png(palette), "a palette cat with transparency"), (_png(rgba), "a cat with an alpha channel"),
        (_png(cat.convert("CMYK"), "JPEG"), "a cmyk cat"), (_png(sixteen), "sixteen bit noise"),
        (_png(Image.new("RGB", (1, 1), (200, 10, 10))), "a single red pixel"),
        (_png(photo), " ".join(["a very long caption"] * 300)),
    ]
    good = (good * 4)[:32]  # duplicates included
    truncated = _png(photo, "JPEG")[:200]
    bad = [
        ({"bytes": None, "path": str(folder / "missing.jpg")}, "a missing file", "missing_file"),
        ({"bytes": b"", "path": None}, "zero bytes", "empty_image_record"),
        ({"bytes": truncated, "path": None}, "a truncated jpeg", "undecodable_image"),
        ({"bytes": b"this is not an image at all", "path": None}, "a text file", "undecodable_image"),
        ({"bytes": _png(Image.new("L", (200, 200))), "path": None}, "a decompression bomb", "too_large"),
        ({"bytes": _png(photo), "path": None}, "", "empty_caption"),
        ({"bytes": _png(photo), "path": None}, "   \n\t ", "empty_caption"),
        ({"bytes": _png(photo), "path": None}, b"\xff\xfe not utf-8 \xc3\x28", "non_utf8_caption"),
    ] * 2
    rows = {"image": [{"bytes": b, "path": None} for b, _ in good] + [b[0] for b in bad],
            "caption": [c.encode() for _, c in good] + [c if isinstance(c, bytes) else c.encode() for _, c, _ in bad]}
    expected = {}
    for _, _, reason in bad:
        expected[reason] = expected.get(reason, 0) + 1
    features = Features({"image": ImageFeature(decode=False), "caption": Value("binary")})
    path = folder / "dirty.parquet"
    (folder / "missing.jpg").write_bytes(_png(photo))  # exists while the file is written (datasets stats it) ...
    Dataset.from_dict(rows, features=features).to_parquet(str(path))
    (folder / "missing.jpg").unlink()                  # ... and is gone when training reads it
    return path, expected


def _png(image, fmt="PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _torchrun_train(out: Path, *flags) -> subprocess.CompletedProcess:
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train_lightclip.py"), "--recipe", "tiny", "--per_device_eval_batch_size", "8", "--logging_steps",
         "1", "--dataloader_num_workers", "0", "--output_dir", str(out), "--label_column", "none", *flags],
        env=env, capture_output=True, text=True, timeout=600, cwd=REPO)


def _labelled_csv(folder: Path, labels: list, name: str = "val.csv") -> Path:
    names = image_files(folder, len(labels))
    path = folder / name
    path.write_text("image,caption,label\n" + "".join(f"{n},{CAPTIONS[i % 8]},{label}\n"
                                                     for i, (n, label) in enumerate(zip(names, labels))))
    return path


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
        train_lightclip.main(tiny_train_argv(tmp_path / "out", "--train_file", str(path)))


def test_a_messy_csv_trains_and_reports_its_skipped_rows(tmp_path):
    import train_lightclip

    names = image_files(tmp_path, 12)
    rows = [f"{name},{caption}".encode() for name, caption in zip(names, CAPTIONS * 2)]
    rows.insert(3, "img0.png,une l\u00e9gende".encode("cp1252"))
    rows.insert(6, b"img1.png,too,many,fields")
    (tmp_path / "train.csv").write_bytes(b"image,caption\n" + b"\n".join(rows) + b"\n")
    out = tmp_path / "run"
    train_lightclip.main(tiny_train_argv(out, "--train_file", str(tmp_path / "train.csv"), "--validation_file",
                               str(tmp_path / "train.csv"), "--label_column", "none"))
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert train["train_skipped_undecodable_text"] == 1 and train["train_skipped_malformed_row"] == 1
    assert evaluation["eval_skipped_undecodable_text"] == 1 and evaluation["eval_num_samples"] == 12


def test_imagefolder_images_without_a_metadata_row_are_counted(tmp_path):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    folder = tmp_path / "train"
    folder.mkdir()
    names = image_files(folder, 5)
    (folder / "metadata.csv").write_text("file_name,caption\n" + "".join(f"{n},a photo {i}\n"
                                                                         for i, n in enumerate(names[:3])))
    splits = load_image_text_datasets(DataArguments(dataset_name="imagefolder", data_dir=str(tmp_path)))
    assert len(splits["train"]) == 3
    assert splits.file_skips["train"]["image_without_metadata"] == 2


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

    names = image_files(tmp_path, 6)
    few = tmp_path / "few.csv"
    few.write_text("image,caption\n" + "".join(f"{n},{c}\n" for n, c in zip(names, CAPTIONS)))
    with pytest.raises(ValueError, match="6 usable samples, fewer than one global batch"):
        train_lightclip.main(tiny_train_argv(tmp_path / "a", "--train_file", str(few), "--per_device_train_batch_size", "8"))
    empty = tmp_path / "empty.csv"
    empty.write_text("image,caption\n" + "".join(f"{n},\u200b[PAD] [PAD]\u200b\n" for n in names) * 3,
                     encoding="utf-8")
    with pytest.raises(ValueError, match="no usable caption .*18 empty_caption"):
        train_lightclip.main(tiny_train_argv(tmp_path / "b", "--train_file", str(empty)))
    with pytest.raises(ValueError, match="--do_train false evaluates an existing model"):
        train_lightclip.main(tiny_train_argv(tmp_path / "c", "--do_train", "false"))
    # images bad in the first rows only: the start-up probe looks across the file, the run trains
    mostly_good = tmp_path / "mostly_good.csv"
    rows = [f"missing{i}.png,a missing image" for i in range(8)] + [f"{n},{c}" for n, c in zip(names * 4, CAPTIONS * 3)]
    mostly_good.write_text("image,caption\n" + "\n".join(rows) + "\n")
    train_lightclip.main(tiny_train_argv(tmp_path / "d", "--train_file", str(mostly_good), "--do_eval", "false"))


def test_numeric_captions_train(tmp_path):
    import train_lightclip

    names = image_files(tmp_path, 8)
    path = tmp_path / "numbers.csv"
    path.write_text("image,caption\n" + "".join(f"{n},{1990 + i}\n" for i, n in enumerate(names)))
    out = tmp_path / "run"
    train_lightclip.main(tiny_train_argv(out, "--train_file", str(path), "--do_eval", "false"))
    train = json.loads((out / "train_results.json").read_text())
    assert not any(k.startswith("train_skipped_") for k in train)
    losses = [e["loss"] for e in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in e]
    assert len(losses) == 2 and all(x > 0 for x in losses)


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
    train_lightclip.main(tiny_train_argv(out, "--train_file", str(path), "--validation_file", str(path),
                               "--zero_shot_templates", "a photo of a {}."))
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_num_samples"] == 20 and math.isfinite(evaluation["eval_loss"])
    assert evaluation["eval_zero_shot_unlabelled"] == 1 and 0 <= evaluation["eval_zero_shot_top1"] <= 1


def test_an_eval_set_smaller_than_one_batch_has_a_loss(tmp_path):
    import train_lightclip

    path = _labelled_csv(tmp_path, [0, 1, 0, 1, 0, 1])
    out = tmp_path / "run"
    train_lightclip.main(tiny_train_argv(out, "--train_file", str(_labelled_csv(tmp_path, [0] * 8, "train.csv")), "--validation_file",
                               str(path), "--class_names", "a,b"))
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_num_samples"] == 6 and math.isfinite(evaluation["eval_loss"])


def test_counts_survive_workers_and_exclude_prefetched_batches(tmp_path, monkeypatch):
    import train_lightclip

    names = image_files(tmp_path, 16)
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
    train_lightclip.main(tiny_train_argv(out, "--train_file", str(path), "--validation_file", str(path), "--label_column",
                               "none", "--streaming", "--max_steps", "3", "--dataloader_num_workers", "2"))
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert train["train_skipped_missing_file"] == 3             # 3 trained batches, not the ones prefetched after
    assert evaluation["eval_skipped_samples"] == 8 and evaluation["eval_num_samples"] == 16


def test_the_csv_builder_with_a_data_dir_reads_row_by_row_too(tmp_path):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    names = image_files(tmp_path, 4)
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
    names = image_files(tmp_path / "images", 2)
    path = tmp_path / "train.csv"
    path.write_text("image,caption\n" + "".join(f"images\\{n},photo {i}\n" for i, n in enumerate(names)))
    dataset = load_image_text_datasets(DataArguments(train_file=str(path)))["train"]
    assert dataset["image"] == [str(tmp_path / "images" / n) for n in names]


def test_an_unterminated_quote_costs_its_own_line_only(tmp_path):
    from modeling_lightclip.training.tables import read_table

    lines = ["image,caption"] + [f"img{i}.png,caption number {i}" for i in range(1, 18)]   # 18 lines
    lines[10] = 'img10.png,"a caption whose quote never closes'                             # line 11
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    columns, report = read_table(tmp_path / "train.csv", text_columns=("image", "caption"))
    assert report.skipped == {"unterminated_quote": 1} and report.lines["unterminated_quote"] == [11]
    assert columns["image"] == [f"img{i}.png" for i in range(1, 18) if i != 10]   # lines 12-18 kept, 16 rows
    # a quoted caption spanning lines and one holding the delimiter are still one good row each
    (tmp_path / "ok.csv").write_text('image,caption\na.png,"two\nlines"\nb.png,"a, b and c"\n')
    columns, report = read_table(tmp_path / "ok.csv", text_columns=("image", "caption"))
    assert columns["caption"] == ["two\nlines", "a, b and c"] and not report.skipped


def test_a_lone_surrogate_in_json_lines_is_one_counted_row(tmp_path):
    import train_lightclip

    names = image_files(tmp_path, 9)
    rows = [{"image": n, "caption": CAPTIONS[i % len(CAPTIONS)]} for i, n in enumerate(names)]
    text = "\n".join(json.dumps(r) for r in rows[:8]) + "\n"
    text += '{"image": "%s", "caption": "half an emoji \\ud83d here"}\n' % names[8]   # valid JSON, invalid Unicode
    (tmp_path / "train.jsonl").write_text(text)
    out = tmp_path / "run"
    train_lightclip.main(tiny_train_argv(out, "--train_file", str(tmp_path / "train.jsonl"), "--do_eval", "false"))
    assert json.loads((out / "train_results.json").read_text())["train_skipped_invalid_unicode"] == 1


def test_utf16_without_a_byte_order_mark_names_the_encoding(tmp_path, capsys):
    names = image_files(tmp_path, 4)
    text = "image,caption\n" + "".join(f"{n},{CAPTIONS[i]}\n" for i, n in enumerate(names))
    (tmp_path / "train.csv").write_bytes(text.encode("utf-16-le"))                       # no BOM
    code, err = run_cli(tiny_train_argv(tmp_path / "run", "--train_file", str(tmp_path / "train.csv")), capsys)
    assert code == 2 and "Traceback" not in err and "\x00" not in err
    assert "--file_encoding utf-16-le" in err
    (tmp_path / "be.csv").write_bytes(text.encode("utf-16-be"))
    code, err = run_cli(tiny_train_argv(tmp_path / "run2", "--train_file", str(tmp_path / "be.csv")), capsys)
    assert code == 2 and "--file_encoding utf-16-be" in err


def test_imagefolder_metadata_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    names = image_files(tmp_path, 4)
    rows = [f"{n},{CAPTIONS[i]}".encode() for i, n in enumerate(names)]
    rows[2] = f"{names[2]},a caf".encode() + b"\xe8 on the corner"                       # cp1252, line 4
    (tmp_path / "metadata.csv").write_bytes(b"file_name,caption\n" + b"\n".join(rows) + b"\n")
    code, err = run_cli(tiny_train_argv(tmp_path / "run", "--dataset_name", "imagefolder", "--data_dir", str(tmp_path)), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'metadata.csv'}, line 4: byte 0xe8 is not UTF-8" in err and "iconv" in err


def test_an_integer_caption_column_in_parquet_trains_as_text(tmp_path):
    from datasets import Dataset

    import train_lightclip

    names = image_files(tmp_path, 8)
    Dataset.from_dict({"image": [str(tmp_path / n) for n in names],
                       "caption": [1984 + i for i in range(8)]}).to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "run"
    train_lightclip.main(tiny_train_argv(out, "--train_file", str(tmp_path / "train.parquet"), "--do_eval", "false"))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.tokenize("1990") == ["1990"]        # the tokenizer was trained on the numbers as words


@pytest.mark.parametrize("caption", ["[CLS][SEP]", "[PAD][PAD][PAD]", "[SEP]\u200b[CLS]", " [MASK] [PAD]"])
def test_special_token_strings_however_spaced_are_empty(caption, tokenizer):
    from modeling_lightclip.training.data import clean_caption

    specials = frozenset(tokenizer.all_special_tokens)
    assert clean_caption(caption, specials) == (None, "empty_caption")
    assert clean_caption(f"a cat {caption} on a mat", specials)[0] is not None   # with words, it is a caption


def test_one_tokenisation_rule_for_training_the_saved_processor_and_prompts(tmp_path):
    """'a [MASK] on a mat' tokenised by the training collator, by the saved processor (what AutoProcessor and the Hub
    pipeline load) and for the zero-shot prompts gives the same ids, none of them the mask token's."""
    from transformers import AutoProcessor

    import train_lightclip
    from modeling_lightclip.training.data import ImageTextCollator

    out = tmp_path / "run"
    train_lightclip.main(tiny_train_argv(out, "--max_train_samples", "32", "--do_eval", "false"))
    caption = "a [MASK] shirt on a [SEP] mat"
    processor = AutoProcessor.from_pretrained(out, trust_remote_code=True)
    mask_id = processor.tokenizer.mask_token_id
    saved = processor(text=[caption], return_tensors="pt")["input_ids"][0].tolist()
    collated = ImageTextCollator(processor, train=True)([{"image": Image.open(FIXTURES / "astronaut.jpg"),
                                                          "caption": caption}])["input_ids"][0].tolist()
    prompt = processor.tokenizer(["a [MASK] shirt on a [SEP] mat"], padding=True)["input_ids"][0]
    assert saved == collated == prompt
    assert mask_id not in saved and saved.count(processor.tokenizer.sep_token_id) == 1   # only the real end token


def test_pandas_float_labels_are_class_ids_and_missing_names_are_said(tmp_path, caplog):
    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets, prepare_zero_shot_labels

    names = image_files(tmp_path, 4)
    (tmp_path / "val.csv").write_text("image,caption,label\n" + "".join(
        f"{n},{CAPTIONS[i]},{label}\n" for i, (n, label) in enumerate(zip(names, ["0.0", "1.0", "", "2.0"]))))
    args = DataArguments(validation_file=str(tmp_path / "val.csv"), class_names="shirt,boot,bag")
    dataset, class_names = prepare_zero_shot_labels(load_image_text_datasets(args)["validation"], args)
    assert dataset["label"] == [0, 1, -1, 2] and class_names == ["shirt", "boot", "bag"]
    args = DataArguments(validation_file=str(tmp_path / "val.csv"))
    with caplog.at_level("WARNING"):
        dataset, class_names = prepare_zero_shot_labels(load_image_text_datasets(args)["validation"], args)
    assert class_names is None and dataset["label"] == [0, 1, -1, 2]
    said = [r.getMessage() for r in caplog.records if "zero-shot classification is skipped" in r.getMessage()]
    assert len(said) == 1 and "--class_names" in said[0]


def test_a_stream_longer_than_the_probe_is_not_refused_for_its_size(tmp_path):
    """A stream's size is unknown: its first rows can only refuse it when the stream ends within them."""
    from datasets import Dataset

    from modeling_lightclip.training.data import check_usable_samples

    names = image_files(tmp_path, 2)
    rows = {"image": [str(tmp_path / names[i % 2]) for i in range(40)], "caption": [f"cat {i}" for i in range(40)]}
    long_stream = Dataset.from_dict(rows).to_iterable_dataset()
    check_usable_samples(long_stream, "image", "caption", min_samples=128)          # 40 > the 32 probed: unknown
    short_stream = Dataset.from_dict({k: v[:10] for k, v in rows.items()}).to_iterable_dataset()
    with pytest.raises(ValueError, match="has 10 usable samples, fewer than one global batch"):
        check_usable_samples(short_stream, "image", "caption", min_samples=128)


def test_dirty_dataset_trains_and_evaluates_with_counts(tmp_path, monkeypatch):
    import train_lightclip

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)  # 200x200 = 40,000 pixels: a "bomb"; photos are 96x96
    path, expected = _dirty_parquet(tmp_path)
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--train_file", str(path), "--validation_file", str(path),
                          "--label_column", "none", "--per_device_train_batch_size", "8",
                          "--per_device_eval_batch_size", "16", "--max_steps", "6", "--logging_steps", "1",
                          "--output_dir", str(out), "--seed", "3"])
    train = json.loads((out / "train_results.json").read_text())
    evaluation = json.loads((out / "eval_results.json").read_text())
    # every row is seen once in the epoch (48 rows, batch 8, nothing dropped)
    seen = {k[len("train_skipped_"):]: v for k, v in train.items() if k.startswith("train_skipped_")}
    expected_train = {("undecodable_image" if k == "empty_image_record" else k): 0 for k in expected}
    for reason, count in expected.items():
        expected_train["undecodable_image" if reason == "empty_image_record" else reason] += count
    assert seen == expected_train
    assert train["train_repaired_transparency"] > 0 and train["train_repaired_cmyk"] > 0
    assert train["train_repaired_high_bit_depth"] > 0
    assert evaluation["eval_num_samples"] == 32 and evaluation["eval_skipped_samples"] == 16
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses and all(math.isfinite(x) for x in losses)
    assert any("skipped_missing_file" in entry for entry in state["log_history"])


def test_dirty_dataset_streaming(tmp_path, monkeypatch):
    import train_lightclip

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20000)
    path, _ = _dirty_parquet(tmp_path)
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--train_file", str(path), "--streaming", "--max_steps", "6",
                          "--tokenizer_name", str(saved_tokenizer(tmp_path)), "--per_device_train_batch_size", "8",
                          "--do_eval", "false", "--output_dir", str(out)])
    train = json.loads((out / "train_results.json").read_text())
    # the 16 bad rows are the last 16 of 48: steps 5 and 6 train on them (counted once, as in the map-style run)
    assert sum(v for k, v in train.items() if k.startswith("train_skipped_") and "empty_batch" not in k) == 16
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6


def test_a_batch_of_only_bad_samples_is_a_zero_step(tiny_model, tokenizer):
    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.trainer import LightCLIPTrainer
    from modeling_lightclip.training.arguments import LightCLIPTrainingArguments

    collator = ImageTextCollator(build_processor(32, tokenizer))
    batch = collator([{"image": b"not an image", "caption": "x"}, {"image": None, "caption": "y"}])
    assert batch["skipped"] == {"undecodable_image": 1, "missing_image": 1, "empty_batch": 1}
    assert "pixel_values" not in batch and batch["empty_batch"].shape == (0,)
    trainer = LightCLIPTrainer(model=tiny_model.train(), args=LightCLIPTrainingArguments(output_dir="/tmp/unused"))
    loss = trainer.compute_loss(tiny_model, batch)
    assert loss.item() == 0.0
    loss.backward()
    assert all(p.grad is not None and not p.grad.abs().sum() for p in tiny_model.parameters())


def test_corrupt_file_in_a_decoding_image_column(tmp_path):
    """An `Image()` column (decoded by datasets on read, as imagefolder and Hub datasets have) with a corrupt file:
    the loader defers decoding to the collator, which skips and counts it instead of crashing."""
    import train_lightclip
    from datasets import Dataset, Features, Image as ImageFeature, Value

    good = _png(Image.open(FIXTURES / "astronaut.jpg").convert("RGB"))
    rows = {"image": [{"bytes": good, "path": None}] * 15 + [{"bytes": b"\x89PNG corrupt", "path": None}],
            "caption": [f"an astronaut number {i}" for i in range(16)]}
    features = Features({"image": ImageFeature(), "caption": Value("string")})
    Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "data.parquet"))
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--train_file", str(tmp_path / "data.parquet"), "--max_steps", "2",
                          "--per_device_train_batch_size", "8", "--do_eval", "false", "--output_dir", str(out)])
    assert json.loads((out / "train_results.json").read_text())["train_skipped_undecodable_image"] == 1


def test_json_nested_deeper_than_the_parser_goes_is_a_malformed_row(tmp_path):
    from PIL import Image

    from modeling_lightclip.training.data import DataArguments, load_image_text_datasets

    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    good = json.dumps({"image": "a.png", "caption": "a red square"})
    for depth in (5_000, 200_000):
        deep = '{"image": "a.png", "caption": ' + "[" * depth + "]" * depth + "}"
        (tmp_path / "rows.jsonl").write_text("\n".join([good, good, deep, good]) + "\n")
        train = load_image_text_datasets(DataArguments(train_file=str(tmp_path / "rows.jsonl")))["train"]
        assert len(train) == 3 and train[0]["caption"] == "a red square"
    (tmp_path / "rows.json").write_text("[" + good + ", " + deep + "]")
    with pytest.raises(ValueError, match="nests deeper than Python's parser goes"):
        load_image_text_datasets(DataArguments(train_file=str(tmp_path / "rows.json")))


def test_two_processes_skip_bad_images_and_count_each_once(tmp_path):
    """One sample per process per step over exactly one epoch: each bad image empties its process's batch in some
    step (the other process's sample that step is dropped with it and counted as such), every row is seen once, and
    evaluation embeds every good row once."""
    bad = {1, 5, 9}
    names = image_files(tmp_path, 24, bad)
    data = tmp_path / "train.csv"
    data.write_text("image,caption\n" + "".join(f"{n},a photo number {i}\n" for i, n in enumerate(names)))
    out = tmp_path / "run"
    proc = _torchrun_train(out, "--train_file", str(data), "--validation_file", str(data),
                           "--per_device_train_batch_size", "1", "--max_steps", "12")
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = json.loads((out / "train_results.json").read_text())
    assert train["epoch"] == 1.0
    assert train["train_skipped_undecodable_image"] == len(bad)
    assert train["train_skipped_empty_batch"] == len(bad)  # a batch of one bad sample is empty
    # a step with one bad sample drops the other process's good one; a step with two drops nothing more
    assert train.get("train_skipped_other_process_batch_empty", 0) in (len(bad), len(bad) - 2)
    evaluation = json.loads((out / "eval_results.json").read_text())
    assert evaluation["eval_num_samples"] == 24 - len(bad)
    assert evaluation["eval_skipped_undecodable_image"] == len(bad)


def test_two_processes_stream_rows_with_junk_and_count_file_errors_once(tmp_path):
    """A streamed JSON-lines file with malformed lines, a row without an image and undecodable images: both
    processes train with batches of different sizes, and the file's malformed lines are counted once in all."""
    names = image_files(tmp_path, 24, {1, 5, 9})
    lines = [json.dumps({"image": n, "caption": f"a photo number {i}"}) for i, n in enumerate(names)]
    lines[4] = '{"image": "img2.png", "caption": "cut off'
    lines[11] = "[1, 2, 3]"
    lines[15] = json.dumps({"image": None, "caption": "no image"})
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(lines) + "\n")
    csv = tmp_path / "val.csv"
    csv.write_text("image,caption\n" + "".join(f"{n},a photo number {i}\n" for i, n in enumerate(names)))
    out = tmp_path / "run"
    proc = _torchrun_train(out, "--train_file", str(data), "--validation_file", str(csv), "--streaming",
                           "--per_device_train_batch_size", "4", "--max_steps", "3")
    assert proc.returncode == 0, proc.stderr[-4000:]
    train = json.loads((out / "train_results.json").read_text())
    assert train["train_skipped_malformed_json"] == 2
    seen_bad = train.get("train_skipped_undecodable_image", 0) + train.get("train_skipped_missing_image", 0)
    assert 0 < seen_bad <= 4  # 3 steps x 2 processes x 4 rows = 24 rows read: the 22 lines that parse, once each


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_unicode_line_separators_inside_a_caption_keep_the_row_and_the_whole_caption(tmp_path, suffix):
    from modeling_lightclip.training.data import clean_caption
    from modeling_lightclip.training.tables import read_table

    captions = ["a line\u2028separator", "a next\u0085line", "a paragraph\u2029separator", "a form\x0cfeed",
                "a vertical\x0btab", "plain", "a file\x1cseparator"]
    if suffix == ".csv":
        text = "image,caption\n" + "".join(f"img{i}.png,{c}\r\n" for i, c in enumerate(captions))
    else:
        text = "".join(json.dumps({"image": f"img{i}.png", "caption": c}, ensure_ascii=False) + "\n"
                       for i, c in enumerate(captions))
    path = tmp_path / f"pairs{suffix}"
    path.write_bytes(text.encode("utf-8"))
    columns, report = read_table(path, text_columns=("image", "caption"), caption_column="caption")
    assert not report.skipped and columns["caption"] == captions and columns["image"][-1] == "img6.png"
    assert [clean_caption(c)[0] for c in columns["caption"]] == [" ".join(c.replace("\x1c", " ").split())
                                                                 for c in captions]


def test_a_caption_that_is_an_object_or_a_nested_list_is_counted_not_trained_as_its_json(tmp_path):
    from modeling_lightclip.training.data import clean_caption
    from modeling_lightclip.training.tables import read_table

    rows = [{"image": "a.png", "caption": {"text": "a cat"}}, {"image": "b.png", "caption": [["a", "b"]]},
            {"image": "c.png", "caption": ["one", "two"]}, {"image": "d.png", "caption": "three"},
            {"image": "e.png", "caption": [{"text": "x"}]}, {"image": "f.png", "caption": 1984}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    columns, report = read_table(path, text_columns=("image", "caption"), caption_column="caption")
    assert report.skipped == {"caption_not_text": 3} and report.lines["caption_not_text"] == [1, 2, 5]
    assert columns["caption"] == [["one", "two"], ["three"], ["1984"]]  # with lists present: every row a list
    assert clean_caption({"text": "a cat"}) == (None, "caption_not_text")  # from parquet or a Hub dataset too


@pytest.mark.parametrize("written, given, outcome", [
    ("utf-32", "utf-8", "read"),          # with a byte-order mark (FF FE 00 00: not UTF-16's FF FE)
    ("utf-32-be", "utf-8", "read"),
    ("utf-32-le", "utf-32-le", "read"),
    ("utf-32-le", "utf-8", "Pass --file_encoding utf-32-le"),
    ("utf-32-be", "utf-8", "Pass --file_encoding utf-32-be"),
    ("utf-32-be", "utf-32", "--file_encoding utf-32-le or utf-32-be"),
    ("utf-16-le", "utf-8", "Pass --file_encoding utf-16-le")])
def test_utf32_files_are_read_or_refused_naming_the_encoding(tmp_path, written, given, outcome):
    import codecs

    from modeling_lightclip.training.tables import TableFileError, read_table

    captions = [f"a photo {i} of a caf\u00e9 \u2615" for i in range(6)]
    text = "image,caption\n" + "".join(f"img{i}.png,{c}\n" for i, c in enumerate(captions))
    raw = text.encode(written)
    if written == "utf-32-be" and outcome == "read":
        raw = codecs.BOM_UTF32_BE + raw
    path = tmp_path / "pairs.csv"
    path.write_bytes(raw)
    if outcome == "read":
        columns, report = read_table(path, given, caption_column="caption")
        assert columns["caption"] == captions and not report.skipped
    else:
        with pytest.raises(TableFileError, match=re.escape(outcome)):
            read_table(path, given, caption_column="caption")


def test_a_fifo_or_a_folder_as_an_image_path_is_skipped_without_opening_it(tmp_path):
    from modeling_lightclip.training.data import ImageRejected, load_image

    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for path in (fifo, tmp_path):
        with pytest.raises(ImageRejected) as rejected:
            load_image(str(path))
        assert rejected.value.reason == "not_a_file"
    with pytest.raises(ImageRejected):
        load_image({"path": str(fifo), "bytes": None})
    with pytest.raises(FileNotFoundError):
        load_image(str(tmp_path / "gone.png"))


def test_a_csv_with_a_fifo_among_its_images_trains_and_counts_it(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    names = image_files(images, 8, set())
    os.mkfifo(images / "pipe.png")
    data = images / "train.csv"
    data.write_text("image,caption\n" + "pipe.png,a pipe\n" + "".join(f"{n},a photo number {i}\n"
                                                                      for i, n in enumerate(names)))
    out = tmp_path / "run"
    train_lightclip.main(["--recipe", "tiny", "--train_file", str(data), "--per_device_train_batch_size", "9",
                          "--max_steps", "1", "--do_eval", "false", "--dataloader_num_workers", "0",
                          "--output_dir", str(out)])
    assert json.loads((out / "train_results.json").read_text())["train_skipped_not_a_file"] == 1
