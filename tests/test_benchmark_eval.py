"""`lightclip-eval` on benchmark sets in clip_benchmark's webdataset layout (written here with clip_benchmark's own
export functions): scores against an independent per-item computation, equal to clip_benchmark's own evaluation
through the registered `lightclip` model type, one message for a broken set, and 2 gloo processes = 1."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CAPTIONS

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["tabby cat", "dog", "red car", "ankle boot", "bowl of fruit", "astronaut"]  # words the tokenizer knows
WORDS = sorted({word for caption in CAPTIONS for word in caption.split()})
TEMPLATES = ["a picture of a {c}.", "{c}"]


def _picture(label: int, variant: int):
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(100 * label + variant)
    image = Image.fromarray(rng.integers(0, 60, size=(40, 40, 3), dtype=np.uint8))
    colour = [(220, 30, 30), (30, 200, 30), (30, 30, 220), (230, 230, 20), (250, 250, 250), (5, 5, 5)][label]
    draw = ImageDraw.Draw(image)
    offset = int(rng.integers(0, 8))
    shape = [(6 + offset, 6 + offset), (30 + offset // 2, 30 + offset // 2)]
    (draw.ellipse if label % 2 else draw.rectangle)(shape, fill=colour)
    return image


def _caption(i: int, j: int) -> str:
    """A caption of known words, distinct for each (image, caption) (no two tokenise alike: no exact ties)."""
    return " ".join(np.random.default_rng([i, j]).choice(WORDS, size=6))


class _Listed(list):
    """A list of samples that carries the class names and templates, as clip_benchmark's exporter reads them."""

    classes, templates = CLASSES, TEMPLATES


@pytest.fixture(scope="module")
def benchmark_sets(tmp_path_factory):
    from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, convert_retrieval_dataset

    root = tmp_path_factory.mktemp("wds")
    samples = _Listed((_picture(i % len(CLASSES), i), i % len(CLASSES)) for i in range(27))
    convert_dataset(samples, "test", str(root / "wds-shapes"), transform=PIL_to_bytes("png"), image_format="png",
                    max_count=10, verbose=False)
    pairs = [(_picture(i % len(CLASSES), i), [_caption(i, j) for j in range(2 + (i % 3 == 0))]) for i in range(19)]
    convert_retrieval_dataset(pairs, "test", str(root / "wds-shape_captions"), transform=PIL_to_bytes("png"),
                              image_format="png", max_count=8, verbose=False)
    return root, samples, pairs


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_recipe, tokenizer):
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.recipes import build_model_config

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model = LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer)).eval()
    model.save_pretrained(folder)
    build_processor(model.config.image_size, tokenizer).save_pretrained(folder)
    return folder


def _run_eval(saved_model, root, out, *names):
    from modeling_lightclip.training.benchmark import main

    assert main(["--model", str(saved_model), "--dataset", *names,
                 "--dataset_root", str(root / "wds-{dataset_cleaned}"), "--output", str(out / "{dataset}_{task}.json"),
                 "--batch_size", "4"]) == 0
    return {name: json.loads(next(out.glob(f"{name.removeprefix('wds/')}_*.json")).read_text()) for name in names}


def _oracle_embeddings(saved_model):
    """One item at a time, straight from the model and its processor."""
    from modeling_lightclip import LightCLIPModel, LightCLIPProcessor

    model = LightCLIPModel.from_pretrained(saved_model).eval()
    processor = LightCLIPProcessor.from_pretrained(saved_model)

    def image(picture):
        pixels = processor.image_processor(images=picture.convert("RGB"), return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output[0], dim=-1)

    def text(caption):
        enc = processor.tokenizer([caption], return_tensors="pt")
        with torch.no_grad():
            return F.normalize(model.get_text_features(**enc).pooler_output[0], dim=-1)

    return image, text


def test_lightclip_eval_scores_classification_and_retrieval_like_an_item_by_item_oracle(saved_model, benchmark_sets,
                                                                                       tmp_path):
    from PIL import Image
    from sklearn.metrics import balanced_accuracy_score

    root, samples, pairs = benchmark_sets
    results = _run_eval(saved_model, root, tmp_path, "wds/shapes", "wds/shape_captions")
    assert results["wds/shapes"]["task"] == "zeroshot_classification"
    assert results["wds/shape_captions"]["task"] == "zeroshot_retrieval"
    assert set(results["wds/shapes"]) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    image, text = _oracle_embeddings(saved_model)

    def stored(picture):  # the exporter stored PNGs: the oracle reads the same lossless pixels
        import io

        buffer = io.BytesIO()
        picture.save(buffer, format="png")
        return Image.open(io.BytesIO(buffer.getvalue()))

    classifier = torch.stack([F.normalize(torch.stack([text(t.format(c=c)) for t in TEMPLATES]).mean(0), dim=-1)
                              for c in CLASSES])
    scores = torch.stack([image(stored(p)) for p, _ in samples]) @ classifier.t()
    labels = [label for _, label in samples]
    predicted = scores.argmax(1).tolist()
    top5 = [label in scores[i].topk(5).indices.tolist() for i, label in enumerate(labels)]
    metrics = results["wds/shapes"]["metrics"]
    assert metrics["acc1"] == pytest.approx(np.mean([p == t for p, t in zip(predicted, labels)]), abs=1e-6)
    assert metrics["acc5"] == pytest.approx(np.mean(top5), abs=1e-6)
    assert metrics["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(labels, predicted), abs=1e-6)

    images = torch.stack([image(stored(p)) for p, _ in pairs])
    owners = [i for i, (_, captions) in enumerate(pairs) for _ in captions]
    texts = torch.stack([text(c) for _, captions in pairs for c in captions])
    similarity = texts @ images.t()
    metrics = results["wds/shape_captions"]["metrics"]
    for k in (1, 5, 10):
        caption_hits = [owners[q] in similarity[q].topk(k).indices.tolist() for q in range(len(owners))]
        image_hits = [any(owners[c] == i for c in similarity[:, i].topk(k).indices.tolist()) for i in range(len(pairs))]
        assert metrics[f"image_retrieval_recall@{k}"] == pytest.approx(np.mean(caption_hits), abs=1e-5)
        assert metrics[f"text_retrieval_recall@{k}"] == pytest.approx(np.mean(image_hits), abs=1e-5)


def test_clip_benchmark_itself_scores_a_lightclip_model_as_lightclip_eval_does(saved_model, benchmark_sets, tmp_path):
    root, _, _ = benchmark_sets
    ours = _run_eval(saved_model, root, tmp_path / "ours", "wds/shapes", "wds/shape_captions")
    for name, result in ours.items():
        out = tmp_path / f"{name.replace('/', '-')}.json"
        subprocess.run([sys.executable, "-m", "modeling_lightclip.training.clip_benchmark_model", "eval",
                        "--model_type", "lightclip", "--pretrained", str(saved_model), "--dataset", name,
                        "--dataset_root", str(root / "wds-{dataset_cleaned}"), "--output", str(out), "--no_amp",
                        "--task", result["task"],
                        "--recall_k", "1", "5", "10", "--batch_size", "4", "--num_workers", "0"],
                       check=True, cwd=ROOT, capture_output=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
        theirs = json.loads(out.read_text())
        assert theirs["task"] == result["task"] and theirs["dataset"] == name
        assert set(theirs["metrics"]) == set(result["metrics"])
        for key, value in result["metrics"].items():
            assert theirs["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_a_broken_set_gets_one_message_naming_what_is_missing(benchmark_sets, tmp_path):
    import shutil

    from modeling_lightclip.training.benchmark import open_benchmark

    root, _, _ = benchmark_sets
    broken = tmp_path / "wds-broken"
    shutil.copytree(root / "wds-shapes", broken)
    (broken / "classnames.txt").unlink()
    (broken / "test" / "1.tar").unlink()
    with pytest.raises(ValueError, match=r"wds/broken .*missing: test/1\.tar, classnames\.txt"):
        open_benchmark(broken, "wds/broken")
    (broken / "test" / "nshards.txt").unlink()
    with pytest.raises(ValueError, match=r"missing: test/nshards\.txt"):
        open_benchmark(broken, "wds/broken")
    with pytest.raises(ValueError, match="is not a folder"):
        open_benchmark(tmp_path / "nowhere", "wds/nowhere")
    (broken / "dataset_type.txt").write_text("captioning\n")
    with pytest.raises(ValueError, match="'captioning'"):
        open_benchmark(broken, "wds/broken")


def test_two_processes_score_as_one(saved_model, benchmark_sets, tmp_path):
    root, _, _ = benchmark_sets
    one = _run_eval(saved_model, root, tmp_path / "one", "wds/shapes", "wds/shape_captions")
    out = tmp_path / "two"
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "modeling_lightclip.training.benchmark", "--model", str(saved_model), "--dataset", "wds/shapes",
                    "wds/shape_captions", "--dataset_root", str(root / "wds-{dataset_cleaned}"), "--output",
                    str(out / "{dataset}_{task}.json"), "--batch_size", "4", "--device", "cpu"],
                   check=True, cwd=ROOT, capture_output=True, timeout=300,
                   env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    for name, result in one.items():
        two = json.loads(next(out.glob(f"{name.removeprefix('wds/')}_*.json")).read_text())
        for key, value in result["metrics"].items():
            assert two["metrics"][key] == pytest.approx(value, abs=1e-6), key


def test_benchmark_sets_are_scored_at_each_evaluation_during_training(benchmark_sets, tmp_path):
    """`--benchmark_dirs`: the sets' metrics logged with the eval split's, equal to `lightclip-eval` of the saved
    model; a run without an evaluation split is refused at start-up."""
    import train_lightclip

    root, _, _ = benchmark_sets
    run = tmp_path / "run"
    common = ["--recipe", "tiny", "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps", "2",
              "--per_device_train_batch_size", "8", "--benchmark_dirs", str(root / "wds-shapes"),
              str(root / "wds-shape_captions"), "--report_to", "none", "--dataloader_num_workers", "0"]
    trainer = train_lightclip.main([*common, "--output_dir", str(run), "--eval_strategy", "steps", "--eval_steps", "1"])
    evaluations = [h for h in trainer.state.log_history if "eval_shapes_acc1" in h]
    assert len(evaluations) >= 2 and all("eval_shape_captions_image_retrieval_recall@5" in h
                                         and h["eval_shapes_seconds"] > 0 for h in evaluations)
    final = json.loads((run / "eval_results.json").read_text())
    scored = _run_eval(run, root, tmp_path / "eval", "wds/shapes", "wds/shape_captions")
    for name, result in scored.items():
        for key, value in result["metrics"].items():
            if not (isinstance(value, float) and np.isnan(value)):
                assert final[f"eval_{name.removeprefix('wds/')}_{key}"] == pytest.approx(value, abs=1e-6), key
    with pytest.raises(ValueError, match="--benchmark_dirs .*no evaluation split"):
        train_lightclip.main([*common, "--output_dir", str(tmp_path / "no_eval"), "--do_eval", "false",
                              "--validation_split", "nowhere"])


def test_data_the_trainer_reads_is_scored_with_the_trainers_evaluation(saved_model, tmp_path):
    import csv

    from modeling_lightclip.training.benchmark import main

    rows = []
    for i in range(10):
        path = tmp_path / f"img{i}.png"
        _picture(i % len(CLASSES), i).save(path)
        rows.append({"image": path.name, "caption": _caption(i, 0)})
    with open(tmp_path / "val.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "caption"])
        writer.writeheader()
        writer.writerows(rows)
    out = tmp_path / "val.json"
    assert main(["--model", str(saved_model), "--validation_file", str(tmp_path / "val.csv"), "--output",
                 str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["task"] == "validation" and result["metrics"]["num_samples"] == 10
    from PIL import Image

    image, text = _oracle_embeddings(saved_model)
    images = torch.stack([image(Image.open(tmp_path / row["image"])) for row in rows])
    texts = torch.stack([text(row["caption"]) for row in rows])
    similarity = images @ texts.t()
    for k in (1, 5):
        i2t = np.mean([i in similarity[i].topk(k).indices.tolist() for i in range(10)])
        t2i = np.mean([i in similarity[:, i].topk(k).indices.tolist() for i in range(10)])
        assert result["metrics"][f"image_to_text_r{k}"] == pytest.approx(i2t, abs=1e-6)
        assert result["metrics"][f"text_to_image_r{k}"] == pytest.approx(t2i, abs=1e-6)
    with pytest.raises(SystemExit):
        main(["--model", str(saved_model)])  # nothing to score
