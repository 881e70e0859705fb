"""A locked text tower's outputs, stored with each training row (training side; `--store_locked_text_outputs`).

A text tower locked whole never changes and its input is never augmented, so its output for a caption is the same
at every step: computed once and stored beside the caption, it stands in for the tower's forward pass from then on
(MobileCLIP's dataset reinforcement, applied to the student's own frozen part). The outputs travel in each sample's
own row, as teacher features do, so a shuffled batch can never meet another caption's outputs.

The column is added with `datasets.Dataset.map` and cached in `OUTPUT_DIR/_reinforced/` under a key of the rows'
fingerprint, the caption column, the tower's weights and the tokenisation, so a later run on the same data and tower
reuses it, and any change to either computes it anew. Map-style data only: a stream is read once per epoch anyway,
so there is nothing to reuse.
"""

import hashlib
import logging
from pathlib import Path

import torch

from .data import STORED_TEXT_OUTPUTS
from .teacher_features import REINFORCED_FOLDER, _fingerprint


logger = logging.getLogger(__name__)


def weights_fingerprint(module: torch.nn.Module) -> str:
    """A hash of a module's parameters and buffers (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def store_locked_text_outputs(model, train_dataset, collator, caption_column: str, training_args,
                              batch_size: int = 256):
    """`train_dataset` with a `text_tower_outputs` column: the locked text tower's pooled output for each row's
    caption, tokenised as `collator` tokenises training batches (rows whose caption training skips get none)."""
    from datasets import Dataset, Features, Sequence, Value, concatenate_datasets

    model.check_text_outputs_storable()
    if not isinstance(train_dataset, Dataset):
        raise ValueError("--store_locked_text_outputs needs map-style training data (a stream is read once per epoch, "
                         "so there is nothing to reuse): drop --streaming, or drop the flag.")
    feature = (train_dataset.features or {}).get(caption_column)
    if not (isinstance(feature, Value) and feature.dtype in ("string", "large_string")):
        raise ValueError(f"--store_locked_text_outputs: the caption column {caption_column!r} must hold one caption "
                         f"per row (it holds {feature}); with several captions per image training draws one per "
                         "step, so let the tower run.")
    tokenizer = collator.tokenizer
    key = _fingerprint(train_dataset, caption_column, weights_fingerprint(model.text_model), type(tokenizer).__name__,
                       len(tokenizer), collator.max_length, tokenizer.init_kwargs.get("do_lower_case"))
    folder = Path(training_args.output_dir) / REINFORCED_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    width = model.text_embed_dim
    device = training_args.device
    was_training = model.training

    def outputs(captions):
        cleaned = [collator.clean(caption)[0] for caption in captions]
        rows = [i for i, caption in enumerate(cleaned) if caption is not None]
        column = [None] * len(cleaned)
        if rows:
            text = collator.tokenize([cleaned[i] for i in rows])
            pooled = model.locked_text_outputs(text["input_ids"].to(device), text["attention_mask"].to(device))
            for i, vector in zip(rows, pooled.float().cpu().numpy()):
                column[i] = vector
        return {STORED_TEXT_OUTPUTS: column}

    # the outputs alone are written (not another copy of the images), then joined to the rows column-wise
    captions = train_dataset.select_columns([caption_column])
    model.to(device).eval()
    try:
        with training_args.main_process_first(local=False, desc="storing the locked text tower's outputs"):
            column = captions.map(outputs, input_columns=caption_column, batched=True, batch_size=batch_size,
                                  remove_columns=[caption_column],
                                  features=Features({STORED_TEXT_OUTPUTS: Sequence(Value("float32"), length=width)}),
                                  cache_file_name=str(folder / f"text-tower-{key}.arrow"), new_fingerprint=key,
                                  desc="locked text tower outputs")
    finally:
        model.train(was_training)
    stored = concatenate_datasets([train_dataset, column], axis=1)
    logger.info("the locked text tower's outputs are stored with the %d training rows (%s); training does not run "
                "the tower", len(stored), folder / f"text-tower-{key}.arrow")
    return stored


__all__ = ["store_locked_text_outputs", "weights_fingerprint"]
