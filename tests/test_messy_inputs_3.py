"""Robustness, round 3: the last ways a messy file, a bad path or a diverged run ended in a traceback, a silent loss
or a NaN model. Every input is generated here; expectations come from how it was built (which line is broken,
which bytes were written), never from running the code under test first."""

import json
import math

import pytest
import torch
from PIL import Image

from conftest import CAPTIONS, FIXTURES
from test_messy_inputs import _image_files as _images, _tiny


def _cli(argv, capsys) -> tuple[int, str]:
    import train_lightclip

    code = train_lightclip.cli(argv)
    return code, capsys.readouterr().err


# ------------------------------------------------------------------------------------------ one row, one row lost


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

    names = _images(tmp_path, 9)
    rows = [{"image": n, "caption": CAPTIONS[i % len(CAPTIONS)]} for i, n in enumerate(names)]
    text = "\n".join(json.dumps(r) for r in rows[:8]) + "\n"
    text += '{"image": "%s", "caption": "half an emoji \\ud83d here"}\n' % names[8]   # valid JSON, invalid Unicode
    (tmp_path / "train.jsonl").write_text(text)
    out = tmp_path / "run"
    train_lightclip.main(_tiny(out, "--train_file", str(tmp_path / "train.jsonl"), "--do_eval", "false"))
    assert json.loads((out / "train_results.json").read_text())["train_skipped_invalid_unicode"] == 1


def test_utf16_without_a_byte_order_mark_names_the_encoding(tmp_path, capsys):
    names = _images(tmp_path, 4)
    text = "image,caption\n" + "".join(f"{n},{CAPTIONS[i]}\n" for i, n in enumerate(names))
    (tmp_path / "train.csv").write_bytes(text.encode("utf-16-le"))                       # no BOM
    code, err = _cli(_tiny(tmp_path / "run", "--train_file", str(tmp_path / "train.csv")), capsys)
    assert code == 2 and "Traceback" not in err and "\x00" not in err
    assert "--file_encoding utf-16-le" in err
    (tmp_path / "be.csv").write_bytes(text.encode("utf-16-be"))
    code, err = _cli(_tiny(tmp_path / "run2", "--train_file", str(tmp_path / "be.csv")), capsys)
    assert code == 2 and "--file_encoding utf-16-be" in err


def test_imagefolder_metadata_that_is_not_utf8_names_file_and_line(tmp_path, capsys):
    names = _images(tmp_path, 4)
    rows = [f"{n},{CAPTIONS[i]}".encode() for i, n in enumerate(names)]
    rows[2] = f"{names[2]},a caf".encode() + b"\xe8 on the corner"                       # cp1252, line 4
    (tmp_path / "metadata.csv").write_bytes(b"file_name,caption\n" + b"\n".join(rows) + b"\n")
    code, err = _cli(_tiny(tmp_path / "run", "--dataset_name", "imagefolder", "--data_dir", str(tmp_path)), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"{tmp_path / 'metadata.csv'}, line 4: byte 0xe8 is not UTF-8" in err and "iconv" in err


# ------------------------------------------------------------------------------------------ text that is not what it seems


def test_an_integer_caption_column_in_parquet_trains_as_text(tmp_path):
    from datasets import Dataset

    import train_lightclip

    names = _images(tmp_path, 8)
    Dataset.from_dict({"image": [str(tmp_path / n) for n in names],
                       "caption": [1984 + i for i in range(8)]}).to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "run"
    train_lightclip.main(_tiny(out, "--train_file", str(tmp_path / "train.parquet"), "--do_eval", "false"))
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
    train_lightclip.main(_tiny(out, "--max_train_samples", "32", "--do_eval", "false"))
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

    names = _images(tmp_path, 4)
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


# ------------------------------------------------------------------------------------------ bad paths and recipes


@pytest.mark.parametrize("kind", ["missing", "data_folder", "other_model"])
def test_a_model_path_that_is_not_a_model_is_one_message(kind, tmp_path, capsys):
    if kind == "missing":
        path, expected = tmp_path / "runs" / "nothing-here", "no such folder"
    elif kind == "data_folder":
        path, expected = tmp_path / "photos", "not a model folder (it has no config.json)"
        path.mkdir()
        _images(path, 2)
    else:
        path, expected = tmp_path / "bert", "a 'bert' model, not a LightCLIP one"
        path.mkdir()
        (path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    code, err = _cli(_tiny(tmp_path / "run", "--model_name_or_path", str(path)), capsys)
    assert code == 2 and "Traceback" not in err
    assert f"--model_name_or_path {path}: {expected}" in err


@pytest.mark.parametrize("name, content, expected", [
    ("bad.yaml", "model:\n  image_size: [32\ntraining: {}\n", "not valid YAML"),
    ("bad.json", '{"model": {"image_size": 32,}}', "line 1 column 29: not valid JSON"),
    ("empty.json", "", "is empty"),
])
def test_a_recipe_that_does_not_parse_is_one_message_naming_it(name, content, expected, tmp_path, capsys):
    recipe = tmp_path / name
    recipe.write_text(content)
    code, err = _cli(["--recipe", str(recipe), "--output_dir", str(tmp_path / "run")], capsys)
    assert code == 2 and "Traceback" not in err
    assert f"recipe {recipe}" in err and expected in err


# ------------------------------------------------------------------------------------------ NaN models


def test_a_run_that_ends_nan_saves_no_model_and_names_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """Fewer non-finite steps than the stop-after limit, at the very end: the final model is not written, the run
    exits 2, and the last checkpoint with finite weights is named."""
    from modeling_lightclip import LightCLIPModel

    original = LightCLIPModel.forward

    def diverges_at_step_4(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        self._calls = getattr(self, "_calls", 0) + 1
        if self.training and self._calls >= 4:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(LightCLIPModel, "forward", diverges_at_step_4)
    out = tmp_path / "run"
    code, err = _cli(_tiny(out, "--max_steps", "4", "--max_train_samples", "32", "--save_strategy", "steps",
                           "--save_steps", "2", "--do_eval", "false", "--stop_after_bad_steps", "5"), capsys)
    assert code == 2 and "Traceback" not in err
    assert "training ended with a non-finite model" in err
    assert f"the last good checkpoint is {out / 'checkpoint-2'}" in err
    assert not (out / "model.safetensors").exists() and not (out / "README.md").exists()


@pytest.mark.parametrize("flag, value", [("--soft_label_temperature", "1e-45"), ("--relation_temperature", "1e-6"),
                                         ("--logit_scale_max", "50")])
def test_temperatures_and_scales_have_a_floor_that_keeps_the_loss_finite(flag, value, tmp_path, capsys):
    code, err = _cli(_tiny(tmp_path / "run", flag, value), capsys)
    assert code == 2 and f"({flag})" in err and "Traceback" not in err


def test_the_temperature_floor_keeps_every_loss_finite():
    """At the floors the config allows, the losses of extreme (perfectly aligned or opposed) embeddings are finite in
    float32 and bfloat16."""
    from modeling_lightclip.configuration_lightclip import MAX_LOG_LOGIT_SCALE, MIN_TEMPERATURE
    from modeling_lightclip.objectives_lightclip import FrozenRelationLoss, InstanceContrastiveLoss

    embeds = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), dim=-1)
    for dtype in (torch.float32, torch.bfloat16):
        scale = torch.tensor(math.exp(MAX_LOG_LOGIT_SCALE), dtype=dtype)
        loss = InstanceContrastiveLoss("similarity", MIN_TEMPERATURE, "student")(
            embeds.to(dtype), embeds.flip(0).to(dtype), scale, alpha=0.3)["instance"]
        assert torch.isfinite(loss)
    relation = FrozenRelationLoss(MIN_TEMPERATURE)(embeds, embeds.flip(0), embeds, embeds)["relation"]
    assert torch.isfinite(relation)


def test_a_stream_longer_than_the_probe_is_not_refused_for_its_size(tmp_path):
    """A stream's size is unknown: its first rows can only refuse it when the stream ends within them."""
    from datasets import Dataset

    from modeling_lightclip.training.data import check_usable_samples

    names = _images(tmp_path, 2)
    rows = {"image": [str(tmp_path / names[i % 2]) for i in range(40)], "caption": [f"cat {i}" for i in range(40)]}
    long_stream = Dataset.from_dict(rows).to_iterable_dataset()
    check_usable_samples(long_stream, "image", "caption", min_samples=128)          # 40 > the 32 probed: unknown
    short_stream = Dataset.from_dict({k: v[:10] for k, v in rows.items()}).to_iterable_dataset()
    with pytest.raises(ValueError, match="has 10 usable samples, fewer than one global batch"):
        check_usable_samples(short_stream, "image", "caption", min_samples=128)
