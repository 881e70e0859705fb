"""train_lightclip.py end to end on real images (Fashion-MNIST rows shipped in data/, real photos), 1 and 2
processes, resume, argument parsing, and the metric modules against hand-computed values."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO


EVAL_KEYS = ["eval_zero_shot_top1", "eval_zero_shot_top5", "eval_image_to_text_r1", "eval_image_to_text_r5",
             "eval_image_to_text_r10", "eval_text_to_image_r1", "eval_text_to_image_r5", "eval_text_to_image_r10"]
TINY = ["--recipe", "tiny", "--max_train_samples", "64", "--max_eval_samples", "40", "--per_device_train_batch_size",
        "8", "--per_device_eval_batch_size", "16", "--logging_steps", "1", "--dataloader_num_workers", "0"]


def _train(argv):
    import train_lightclip

    return train_lightclip.main(argv)


def test_end_to_end_tiny_run_writes_metrics_and_a_hub_ready_folder(tmp_path):
    out = tmp_path / "run"
    _train(TINY + ["--max_steps", "4", "--output_dir", str(out)])
    metrics = json.loads((out / "eval_results.json").read_text())
    for key in EVAL_KEYS + ["eval_loss"]:
        assert key in metrics and 0.0 <= metrics[key] <= (1.0 if key != "eval_loss" else 1e9), key
    assert metrics["eval_num_samples"] == 40
    state = json.loads((out / "trainer_state.json").read_text())
    logged = [entry for entry in state["log_history"] if "loss" in entry]
    assert {"loss_instance", "loss_token", "loss_mlm", "soft_label_alpha"} <= set(logged[0])
    # the folder is what the Hub gets: weights, custom code, processor
    for name in ("model.safetensors", "config.json", "modeling_lightclip.py", "processor_config.json",
                 "tokenizer.json"):
        assert (out / name).is_file(), name
    from transformers import AutoModel

    model = AutoModel.from_pretrained(out, trust_remote_code=True)
    assert model.config.soft_label_mode == "similarity"


def test_standalone_eval_of_a_saved_model(tmp_path):
    out = tmp_path / "run"
    _train(TINY + ["--max_steps", "2", "--output_dir", str(out), "--do_eval", "false"])
    assert not (out / "eval_results.json").exists()
    again = tmp_path / "eval"
    _train(TINY + ["--model_name_or_path", str(out), "--do_train", "false", "--output_dir", str(again)])
    metrics = json.loads((again / "eval_results.json").read_text())
    assert set(EVAL_KEYS) <= set(metrics)


def test_csv_with_image_paths(tmp_path, photo_paths):
    """run_clip-style csv: image paths relative to the file, captions beside them."""
    rows = [("astronaut.jpg", "an astronaut in a white suit"), ("chelsea_cat.jpg", "a tabby cat")] * 8
    for name in ("train.csv", "validation.csv"):
        with open(tmp_path / name, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "text"])
            writer.writerows(rows)
    for photo in photo_paths:
        (tmp_path / photo.name).write_bytes(photo.read_bytes())
    out = tmp_path / "run"
    _train(["--recipe", "tiny", "--train_file", str(tmp_path / "train.csv"), "--validation_file",
            str(tmp_path / "validation.csv"), "--image_column", "file", "--caption_column", "text",
            "--label_column", "none", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--output_dir", str(out)])
    metrics = json.loads((out / "eval_results.json").read_text())
    assert "eval_image_to_text_r1" in metrics and "eval_zero_shot_top1" not in metrics
    assert metrics["eval_num_samples"] == 16


def test_resume_continues_from_the_saved_step(tmp_path):
    out = tmp_path / "run"
    base = TINY + ["--output_dir", str(out), "--save_strategy", "steps", "--save_steps", "2", "--do_eval", "false"]
    _train(base + ["--max_steps", "2"])
    assert (out / "checkpoint-2").is_dir()
    _train(base + ["--max_steps", "4", "--resume_from_checkpoint", str(out / "checkpoint-2")])
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    steps = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert steps == [1, 2, 3, 4]  # the resumed run logged steps 3 and 4, after the first run's 1 and 2


def test_recipe_then_flags(tmp_path):
    import train_lightclip

    recipe, model_args, data_args, training_args = train_lightclip.parse_args(
        ["--recipe", "tiny", "--soft_label_mode", "none", "--token_loss_weight", "0", "--learning_rate", "0.5",
         "--output_dir", str(tmp_path)])
    assert recipe["name"] == "tiny"
    assert training_args.per_device_train_batch_size == 8   # from the recipe
    assert training_args.learning_rate == 0.5               # the flag beats the recipe
    assert training_args.dataloader_drop_last and not training_args.remove_unused_columns
    assert training_args.label_names == []
    from modeling_lightclip.training.arguments import config_overrides

    assert config_overrides(model_args) == {"soft_label_mode": "none", "token_loss_weight": 0.0}


def test_two_process_cpu_training(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "train_lightclip.py"), *TINY, "--max_steps", "3", "--output_dir", str(out)],
        env=env, capture_output=True, text=True, timeout=300, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-5000:]
    metrics = json.loads((out / "eval_results.json").read_text())
    assert set(EVAL_KEYS) <= set(metrics)
    assert metrics["eval_num_samples"] == 40  # sharded across 2 ranks, gathered without duplicates
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3


# ---------------------------------------------------------------------------------------------- metrics


def test_zero_shot_metric_by_hand():
    from modeling_lightclip.training.evaluation import load_metric

    metric = load_metric("zero_shot_accuracy")
    predictions = [[0, 1, 2, 3, 4, 5], [5, 4, 3, 2, 1, 0], [1, 0, 2, 3, 4, 5], [2, 3, 4, 5, 1, 0]]
    references = [0, 0, 0, 0]
    # top-1: only sample 0; top-5: samples 0 (rank 1), 2 (rank 2); sample 1 has 0 at rank 6, sample 3 at rank 6
    assert metric.compute(predictions=predictions, references=references, top_k=[1, 5]) == {"top1": 0.25,
                                                                                             "top5": 0.5}


def test_retrieval_metrics_by_hand():
    from modeling_lightclip.training.evaluation import retrieval_metrics

    # 3 pairs in 2-D; image 2 is closest to text 1, the others to their own text
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    texts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    out = retrieval_metrics(images, texts, ks=(1, 2, 3))
    # i2t: image0 -> text0 (rank 1); image1 -> sims [0, .8, 1] -> text1 at rank 2; image2 -> sims [.6, 1, .8] ->
    # text2 at rank 2.   t2i: text0 -> image0 rank 1; text1 -> sims [.6, .8, 1] -> image1 rank 2;
    # text2 -> sims [0, 1, .8] -> image2 rank 2
    assert out["image_to_text_r1"] == pytest.approx(1 / 3) and out["image_to_text_r2"] == 1.0
    assert out["text_to_image_r1"] == pytest.approx(1 / 3) and out["text_to_image_r2"] == 1.0
    # identical captions are one gallery entry: captions (a, a, b) -> texts 0 and 1 merge
    merged = retrieval_metrics(images, texts, captions=["a", "a", "b"], ks=(1, 2))
    # i2t over {a: text0, b: text2}: image0 -> a (rank 1) ok; image1 -> sims a=0, b=1 -> a rank 2; image2 ->
    # a=.6, b=.8 -> b rank 1 ok.  t2i: a -> images {0,1}: sims [1, 0, .6] -> image0 rank 1 ok;
    # b -> image2: sims [0, 1, .8] -> rank 2
    assert merged["image_to_text_r1"] == pytest.approx(2 / 3)
    assert merged["text_to_image_r1"] == pytest.approx(1 / 2)
    assert merged["text_to_image_r2"] == 1.0
