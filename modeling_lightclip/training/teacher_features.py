"""Teacher features for a training run: the one path from the data to the objectives (training side).

Objectives that learn from teachers (frozen-teacher soft labels, relation distillation, cross-modal distillation,
CLIP-PING's neighbours) read each sample's teacher features from its own row, so a sample can never meet another
sample's features. `setup_teacher_features` decides, once, where those rows come from:

* the training data is a **reinforced copy** (`lightclip-reinforce`): its teacher columns, streamed or not;
* `--teacher_features auto`: a reinforced copy of the training split is written once into
  `OUTPUT_DIR/_reinforced/<key>` (the key hashes the data's fingerprint and the teacher settings) with the default
  teacher and trained from (edited, reordered or filtered data has another fingerprint, so it gets its own copy -
  never another data's features);
* `--teacher_features DIR`, a folder `python -m modeling_lightclip.training.neighbours build` wrote (row-indexed
  frozen-encoder features): converted once into a reinforced copy the same way (`FolderFeatures` serves its features
  by source row to `reinforce`), and trained from. Every run with teachers thus trains on a reinforced copy.

CLIP-PING with the memory bank or in-batch neighbours also needs each sample's neighbours, found by row: it keeps a
neighbour index beside the rows (map-style data only).
"""

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..objectives_lightclip import (TEACHER_TARGETS, CrossModalDistillationLoss, FeatureDistillationLoss,
                                    NeighbourGuidance, enabled_objectives, reads_teacher_knowledge)
from .neighbours import FILES, NeighbourTable, nearest_neighbours
from .reinforce import FROZEN_PAIR, FolderFeatures, reinforce
from .reinforced_copy import split_files


logger = logging.getLogger(__name__)
REINFORCED_FOLDER = "_reinforced"  # `--teacher_features auto` writes here (the Hub push skips `_*`)


def teacher_objectives(config) -> list[tuple[str, str]]:
    """(what, the flags that switch it off) for each objective of `config` that reads teacher knowledge (teacher
    features or embeddings, or CLIP-PING's neighbours of those features)."""
    return [(objective.named(config), objective.switch_off(config)) for objective in enabled_objectives(config)
            if set(objective.reads(config)) & TEACHER_TARGETS]


def describe_teacher_objectives(config) -> str:
    return " and ".join(what for what, _ in teacher_objectives(config))


def _switches(config) -> str:
    flags = [flags for _, flags in teacher_objectives(config)]
    return f"{'it' if len(flags) == 1 else 'them'} off: {' '.join(flags)}"


@dataclass
class TeacherSetup:
    """What a run trains from: the training split (carrying the teacher columns, and `sample_id` when CLIP-PING needs
    the bank or in-batch neighbours), CLIP-PING's neighbour table, the teachers' metadata, and the training rows a
    reinforced copy written for this run left out, by reason."""

    train_dataset: object
    neighbours: NeighbourTable | None = None
    teachers: list | None = None
    skipped: dict = field(default_factory=dict)


def setup_teacher_features(config, train_dataset, reinforced: dict | None, data_args, training_args,
                           given: frozenset = frozenset()) -> TeacherSetup:
    """The `TeacherSetup` of a run of `config`; `config.ping_bank_size` and the distilled teacher's logit scale and
    bias are set from the data. `given`: the config fields set on the command line; a teacher scale or bias given
    there that differs from the one the data records is refused (one of the two would be silently ignored)."""
    if not (reads_teacher_knowledge(config) and training_args.do_train and train_dataset is not None):
        return TeacherSetup(train_dataset)
    what = describe_teacher_objectives(config)
    teachers = (reinforced or {}).get("teachers")
    source = getattr(data_args, "teacher_features", None)
    skipped = {}
    if not teachers:
        if data_args.streaming:
            raise ValueError(f"--streaming: {what} read(s) teacher features, which a stream carries only when it is a "
                             "reinforced copy. Write one once with `lightclip-reinforce --out R` (same data flags, "
                             "--streaming works there too) and train with --train_file R --streaming; or switch "
                             f"{_switches(config)} (a tower recipe such as --recipe resnet18 trains plain CLIP).")
        if not source:
            raise ValueError(f"{what} (from the flags, the recipe or the saved config) need(s) teacher features: pass "
                             "--teacher_features auto (a reinforced copy of the training data is built once with the "
                             "packaged teachers) or a folder from `python -m modeling_lightclip.training.neighbours "
                             "build`, train on a copy written by "
                             f"`lightclip-reinforce`, or switch {_switches(config)}.")
        train_dataset, teachers, skipped = reinforced_for_training(train_dataset, source, config, data_args,
                                                                   training_args)
    if FeatureDistillationLoss.enabled(config):
        dims = teacher_feature_dims(train_dataset, teachers)
        if config.feature_distill_teacher_dims and config.feature_distill_teacher_dims != dims:
            raise ValueError(f"feature distillation: the model's projections were built for teacher features of "
                             f"{config.feature_distill_teacher_dims} (image, text) dimensions, and this data's teachers "
                             f"({', '.join(t['name'] for t in teachers)}) give {dims}. Train on data reinforced with "
                             "the same teachers, or start the projections afresh from a recipe.")
        config.feature_distill_teacher_dims = dims
    if CrossModalDistillationLoss.enabled(config):
        multimodal = [t for t in teachers if t.get("kind") == "multimodal"]
        if not multimodal:
            raise ValueError("distill_loss_weight > 0 distils a multimodal teacher's image-text similarities, and this "
                             f"data's teachers ({', '.join(t['name'] for t in teachers)}) are unimodal: reinforce it "
                             "with a CLIP-like teacher (`lightclip-reinforce --teacher ORG/clip-model ...`).")
        _teacher_value(config, "distill_teacher_logit_scale", [t.get("logit_scale") for t in multimodal], given)
        if config.distill_ensemble == "mean_probabilities":  # each teacher's block of the embeddings, its own scale
            config.distill_teacher_dims = [teacher_feature_dims(train_dataset, [t])[0] for t in multimodal]
            config.distill_teacher_logit_scales = [float(t.get("logit_scale") or config.distill_teacher_logit_scale)
                                                   for t in multimodal]
        _teacher_value(config, "distill_teacher_logit_bias", [t.get("logit_bias") for t in multimodal], given)
        if config.uses_sigmoid_loss and config.distill_teacher_logit_bias is None:
            raise ValueError("the sigmoid loss distils each pair's match probability, sigmoid(teacher scale x cosine + "
                             "teacher bias), and this data's teacher has no bias (a softmax-trained, CLIP-like "
                             "teacher's similarities are no probabilities): reinforce the data with a sigmoid-trained "
                             "(SigLIP) teacher, give --distill_teacher_logit_bias B, or distil with --instance_loss "
                             "softmax.")
    neighbours = None
    if NeighbourGuidance.switched_on(config):
        if data_args.streaming:
            raise ValueError("--streaming: CLIP-PING's memory bank and in-batch neighbours find each sample's "
                             "neighbours by row, which a stream has not: train without --streaming, or switch it off "
                             "(--ping_nn_loss_weight 0 --ping_xnn_loss_weight 0).")
        neighbours = neighbour_table(train_dataset, teachers, data_args, training_args)
        config.ping_bank_size = len(train_dataset)
        train_dataset = train_dataset.add_column("sample_id", list(range(len(train_dataset))))
    return TeacherSetup(train_dataset, neighbours, teachers, skipped)


def teacher_feature_dims(train_dataset, teachers: list) -> list[int]:
    """[image, text] dimensions of the teacher features each batch carries (the teachers' concatenated), from what
    the data records of its teachers, else from its feature columns' fixed lengths."""
    features = getattr(train_dataset, "features", None) or {}
    dims = []
    for side in ("image", "text"):
        total = 0
        for teacher in teachers:
            dim = teacher.get(f"{side}_dim") or getattr(features.get(teacher.get("columns", {}).get(side)), "length",
                                                        None)
            if not dim or dim < 0:
                raise ValueError(f"feature distillation needs the size of teacher {teacher.get('name')!r}'s {side} "
                                 "features, which this data does not record: rebuild the copy with "
                                 "lightclip-reinforce.")
            total += int(dim)
        dims.append(total)
    return dims


def _teacher_value(config, field: str, recorded: list, given: frozenset) -> None:
    """`config.<field>` from what the data records of its teachers (their mean), or the configured value when it
    records none; a value given on the command line that differs from the recorded one is refused."""
    if any(value is None for value in recorded):
        return  # not recorded (a copy from before it was, or a teacher without one): the flag or config default rules
    value = float(np.mean(recorded))
    if field in given and not math.isclose(getattr(config, field), value, rel_tol=1e-6, abs_tol=1e-6):
        raise ValueError(f"--{field} {getattr(config, field):g}: the training data records its teacher's value, "
                         f"{value:g}, and distils with that one. Leave the flag out (it is for data that records "
                         "none).")
    setattr(config, field, value)


# ------------------------------------------------------------------------------------------------------ auto


def _fingerprint(dataset, *parts) -> str:
    """What identifies the rows of a map-style split (datasets' fingerprint changes with any edit, reorder or
    filter) together with the teacher settings."""
    base = getattr(dataset, "_fingerprint", None) or str(len(dataset))
    return hashlib.sha256(repr((base, *parts)).encode()).hexdigest()[:16]


def reinforced_for_training(train_dataset, source: str, config, data_args, training_args):
    """`--teacher_features auto` or `--teacher_features DIR`: a reinforced copy of the training split, written once
    into OUTPUT_DIR/_reinforced/ (sharded over the run's processes, resumable) and keyed by the data's fingerprint and
    the teacher, then trained from. `auto` runs the default teacher (the packaged frozen pair); a `neighbours build`
    folder gives its stored features (`FolderFeatures`). Returns (the copy's training split, its teachers, the rows
    it left out by reason)."""
    from datasets import Image as ImageFeature, load_dataset

    from .processes import process_state
    from .stops import writing_to

    image_size = max(64, int(config.image_size))
    if source == "auto":
        specs, teachers, key = [FROZEN_PAIR], None, (FROZEN_PAIR, image_size)
    else:
        teacher = FolderFeatures(Path(source), train_dataset)
        specs, teachers, key = [], [teacher], tuple(sorted(teacher.describe().items()))
    folder = Path(training_args.output_dir) / REINFORCED_FOLDER / _fingerprint(
        train_dataset, data_args.image_column, data_args.caption_column, *key)
    then = (f"--teacher_features {source} writes a reinforced copy of the training data there before training: free "
            "some space or point --output_dir at a larger disk, then rerun the same command (the copy's finished "
            "shards are kept).")
    with writing_to(folder, then=then):  # the copy's shards, and datasets' cache of them
        try:
            meta = reinforce({"train": train_dataset}, folder, specs, data_args.image_column,
                             data_args.caption_column, None, teacher_image_size=image_size, state=process_state(),
                             teachers=teachers, max_aspect_ratio=data_args.max_image_aspect_ratio)
        except ValueError as err:
            raise ValueError(f"--teacher_features {source}: {err}") from None
        copy = load_dataset("parquet", data_files={"train": split_files(folder, "train")})["train"]
    copy = copy.cast_column("image", ImageFeature(decode=False))  # the collator decodes, skips and counts
    renames = {old: new for old, new in (("image", data_args.image_column), ("caption", data_args.caption_column))
               if old != new}
    copy = copy.rename_columns(renames) if renames else copy
    skipped = meta["splits"]["train"]["skipped"]
    if skipped:
        logger.warning("teacher features: %d training sample(s) left out of %s (%s)", sum(skipped.values()), folder,
                       ", ".join(f"{n} {reason}" for reason, n in skipped.items()))
    return copy, meta["teachers"], dict(skipped)


# ------------------------------------------------------------------------------------------------------ folders


def _one_point_per_row(values) -> np.ndarray:
    """(rows, d) float32 of a stored feature column; a row with one vector per caption (several captions per image)
    is the normalised mean of its captions' vectors."""
    values = list(values)
    if not values or not (len(values[0]) and isinstance(values[0][0], (list, tuple, np.ndarray))):
        return np.asarray(values, dtype=np.float32)
    means = np.stack([np.asarray(v, dtype=np.float32).mean(axis=0) for v in values])
    return means / np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)


def neighbour_table(train_dataset, teachers: list, data_args, training_args) -> NeighbourTable:
    """CLIP-PING's neighbours of every training row, found here (faiss or torch, exact) in the first teacher's feature
    spaces and kept beside the run, keyed by the rows' fingerprint."""
    columns = teachers[0]["columns"]
    folder = Path(training_args.output_dir) / REINFORCED_FOLDER / ("neighbours-" + _fingerprint(train_dataset, columns))
    with training_args.main_process_first(local=False, desc="finding the teachers' neighbours"):
        if not (folder / FILES["text_neighbours"]).is_file():  # the main process finds them, the others read them
            folder.mkdir(parents=True, exist_ok=True)
            for side in ("image", "text"):
                features = _one_point_per_row(train_dataset[columns[side]])
                tmp = folder / ("tmp-" + FILES[f"{side}_neighbours"])
                np.save(tmp, nearest_neighbours(features, 8))
                tmp.replace(folder / FILES[f"{side}_neighbours"])
    return NeighbourTable(folder, len(train_dataset), data_args.ping_top_k, training_args.seed)


__all__ = ["REINFORCED_FOLDER", "TeacherSetup", "describe_teacher_objectives", "neighbour_table",
           "reinforced_for_training", "setup_teacher_features", "teacher_feature_dims", "teacher_objectives"]
