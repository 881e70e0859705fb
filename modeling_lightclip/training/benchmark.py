"""`lightclip-eval`: score a saved LightCLIP model the way the field does, on benchmark sets in LAION clip_benchmark's
webdataset layout, with clip_benchmark's metrics and results files, so the figures sit beside published ones.

    lightclip-eval --model ORG/my-lightclip --dataset wds/imagenet1k wds/mscoco_captions \\
        --dataset_root "benchmarks/wds_{dataset_cleaned}" --output "results/{dataset}_{task}.json"

A set is a folder as clip_benchmark's `clip_benchmark_export_wds` (or `webdataset_builder.convert_dataset`) writes
it, or as the `clip-benchmark` organisation's datasets on the Hub ship it (download one with
`huggingface-cli download --repo-type dataset clip-benchmark/wds_imagenet1k --local-dir DIR`):

    DIR/dataset_type.txt                         "retrieval" for image-text retrieval (else classification)
    DIR/classnames.txt                           classification: one class name per line, in label order
    DIR/zeroshot_classification_templates.txt    classification: one prompt per line, the class as {c}
    DIR/test/nshards.txt, DIR/test/0.tar, ...    shards of samples: an image (webp/png/jpg) and a label (.cls)
                                                 or captions (.txt, one per line)

Metrics (names as clip_benchmark writes them): classification `acc1`, `acc5` (NaN under five classes),
`mean_per_class_recall`; retrieval `image_retrieval_recall@k` (a caption finds its image in the top k) and
`text_retrieval_recall@k` (an image finds one of its captions in the top k). Classifier: the normalised mean of each
class's normalised prompt embeddings; logits 100 x cosine. Several processes (`accelerate launch -m
modeling_lightclip.training.benchmark ...`) share the shards' samples and gather the embeddings.

The sets' shards are read with `datasets`' webdataset loader, streamed: a set is never held in memory as images.

Data as the trainer reads it is scored too, with the trainer's own evaluation (its flags after the others):

    lightclip-eval --model outputs/lightclip --validation_file val.csv --output results/val.json
"""

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .evaluation import class_text_embeddings


IMAGE_KEYS = ("webp", "png", "jpg", "jpeg")
TASKS = {"classification": "zeroshot_classification", "retrieval": "zeroshot_retrieval"}


@dataclass
class BenchmarkSet:
    """One benchmark set in clip_benchmark's webdataset layout."""

    name: str                      # as clip_benchmark names it: wds/NAME
    root: Path
    task: str                      # zeroshot_classification | zeroshot_retrieval
    shards: list[str]
    classes: list[str] | None = None
    templates: list[str] | None = None

    @property
    def slug(self) -> str:
        """The name in results file names, as clip_benchmark writes it (wds/a/b -> a_b)."""
        return self.name.removeprefix("wds/").replace("/", "_")


def open_benchmark(root: str | Path, name: str | None = None, split: str = "test") -> BenchmarkSet:
    """The set in `root` (checked: everything missing is named in one message)."""
    root = Path(root)
    name = name or f"wds/{root.name.removeprefix('wds_').removeprefix('wds-')}"  # wds_imagenet1k -> wds/imagenet1k
    if not root.is_dir():
        raise ValueError(f"{name}: {root} is not a folder (a benchmark set in clip_benchmark's webdataset layout: "
                         "dataset_type.txt, classnames.txt, zeroshot_classification_templates.txt, "
                         f"{split}/nshards.txt and {split}/0.tar ...).")
    type_file = root / "dataset_type.txt"
    kind = type_file.read_text().strip().lower() if type_file.is_file() else "classification"
    if kind not in TASKS:
        raise ValueError(f"{name}: {type_file} says {kind!r}; lightclip-eval scores 'classification' and "
                         "'retrieval' sets.")
    missing, shards = [], []
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file():
        missing.append(f"{split}/nshards.txt")
    else:
        try:
            count = int(nshards_file.read_text().strip())
        except ValueError:
            raise ValueError(f"{name}: {nshards_file} should hold the number of shards, not "
                             f"{nshards_file.read_text()[:40]!r}.") from None
        shards = [str(root / split / f"{i}.tar") for i in range(count)]
        missing += [f"{split}/{i}.tar" for i in range(count) if not Path(shards[i]).is_file()]
        if count < 1:
            missing.append(f"{split}/0.tar (nshards.txt says {count})")
    classes = templates = None
    if kind == "classification":
        for file in ("classnames.txt", "zeroshot_classification_templates.txt"):
            if not (root / file).is_file():
                missing.append(file)
        if not missing:
            classes = [line.strip() for line in (root / "classnames.txt").read_text().splitlines() if line.strip()]
            templates = [line.strip() for line in (root / "zeroshot_classification_templates.txt").read_text()
                         .splitlines() if line.strip()]
            if not classes or not templates or any("{c}" not in t for t in templates):
                raise ValueError(f"{name}: classnames.txt needs a class per line and the templates file a prompt "
                                 "per line with the class as {c}.")
    if missing:
        raise ValueError(f"{name} ({root}, a {kind} set) is missing: {', '.join(missing)}. Write the set with "
                         "clip_benchmark's `clip_benchmark_export_wds` or download it complete.")
    return BenchmarkSet(name, root, TASKS[kind], shards, classes, templates)


def _samples(benchmark: BenchmarkSet):
    """The set's samples, streamed from its shards (`datasets`' webdataset loader), split across processes."""
    from datasets import load_dataset
    from datasets.distributed import split_dataset_by_node

    from .processes import process_state

    stream = load_dataset("webdataset", data_files={"test": benchmark.shards}, split="test", streaming=True)
    state = process_state()
    if state.num_processes > 1:
        stream = split_dataset_by_node(stream, rank=state.process_index, world_size=state.num_processes)
    return stream


def _image_of(sample: dict, name: str):
    for key in IMAGE_KEYS:
        if sample.get(key) is not None:
            return sample[key].convert("RGB")
    raise ValueError(f"{name}: sample {sample.get('__key__')!r} has no image ({'/'.join(IMAGE_KEYS)}).")


@torch.no_grad()
def _encode_texts(model, tokenizer, texts: list[str], batch_size: int) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, return_tensors="pt")
        out.append(model.get_text_features(input_ids=enc["input_ids"].to(device),
                                           attention_mask=enc["attention_mask"].to(device)).pooler_output.float())
    return F.normalize(torch.cat(out), dim=-1).cpu()


@torch.no_grad()
def _encode_images(model, image_processor, images: list) -> torch.Tensor:
    device = next(model.parameters()).device
    pixels = image_processor(images=images, return_tensors="pt")["pixel_values"].to(device)
    return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output.float(), dim=-1).cpu()


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict:
    """clip_benchmark's: top-1 and top-5 accuracy (top-5 NaN under five classes) and the mean over the classes
    present of each class's recall."""
    ranked = logits.topk(min(5, logits.shape[1]), dim=1).indices
    hits = ranked == labels[:, None]
    predicted = ranked[:, 0]
    recalls = [float((predicted[labels == c] == c).float().mean()) for c in labels.unique().tolist()]
    return {"acc1": float(hits[:, :1].any(1).float().mean()),
            "acc5": float(hits.any(1).float().mean()) if logits.shape[1] >= 5 else math.nan,
            "mean_per_class_recall": sum(recalls) / len(recalls)}


def clip_benchmark_recall(image_embeds: torch.Tensor, text_embeds: torch.Tensor, text_image: torch.Tensor,
                      ks=(1, 5, 10)) -> dict:
    """clip_benchmark's recall@k: a caption's query is a hit when its image is in the top k images
    (`image_retrieval_recall@k`); an image's, when any of its captions is in the top k captions
    (`text_retrieval_recall@k`)."""
    scores = text_embeds @ image_embeds.t()                         # (captions, images)
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(text_image)), text_image] = True
    out = {}
    for k in ks:
        top_images = scores.topk(min(k, scores.shape[1]), dim=1).indices
        out[f"image_retrieval_recall@{k}"] = float(positive.gather(1, top_images).any(1).float().mean())
        top_texts = scores.t().topk(min(k, scores.shape[0]), dim=1).indices
        out[f"text_retrieval_recall@{k}"] = float(positive.t().gather(1, top_texts).any(1).float().mean())
    return out


def _gather(parts: list):
    """Every process's list of parts, in process order (one process: as is)."""
    from .processes import process_state

    if process_state().num_processes == 1:
        return [parts]
    from accelerate.utils import gather_object

    return gather_object([parts])


def evaluate_benchmark(model, processor, benchmark: BenchmarkSet, batch_size: int = 64,
                       recall_k=(1, 5, 10)) -> dict:
    """The set's metrics for `model` (a `LightCLIPModel`, eval mode), samples shared across processes."""
    was_training = model.training
    model.eval()
    try:
        images, labels, captions, owners = [], [], [], []
        image_batches, seen = [], 0
        for sample in _samples(benchmark):
            images.append(_image_of(sample, benchmark.name))
            seen += 1
            if benchmark.task == "zeroshot_classification":
                if sample.get("cls") is None:
                    raise ValueError(f"{benchmark.name}: sample {sample.get('__key__')!r} has no label (.cls).")
                labels.append(int(sample["cls"]))
            else:
                lines = [line for line in str(sample.get("txt") or "").splitlines() if line.strip()]
                if not lines:
                    raise ValueError(f"{benchmark.name}: sample {sample.get('__key__')!r} has no caption (.txt).")
                owners += [seen - 1] * len(lines)
                captions += lines
            if len(images) == batch_size:
                image_batches.append(_encode_images(model, processor.image_processor, images))
                images = []
        if images:
            image_batches.append(_encode_images(model, processor.image_processor, images))
        image_embeds = torch.cat(image_batches) if image_batches else torch.zeros(0, model.config.projection_dim)
        if benchmark.task == "zeroshot_classification":
            gathered = _gather([image_embeds, torch.tensor(labels, dtype=torch.long)])
            image_embeds = torch.cat([g[0] for g in gathered])
            labels = torch.cat([g[1] for g in gathered])
            if not len(labels):
                raise ValueError(f"{benchmark.name}: no samples in {', '.join(benchmark.shards)}.")
            prompts = [t.replace("{c}", "{}") for t in benchmark.templates]  # clip_benchmark writes the class as {c}
            classifier = class_text_embeddings(model, processor.tokenizer, benchmark.classes, prompts)
            if int(labels.max()) >= len(benchmark.classes) or int(labels.min()) < 0:
                raise ValueError(f"{benchmark.name}: labels run from {int(labels.min())} to {int(labels.max())} "
                                 f"but classnames.txt names {len(benchmark.classes)} classes.")
            return classification_metrics(100.0 * image_embeds @ classifier.t(), labels)
        text_embeds = _encode_texts(model, processor.tokenizer, captions, batch_size) if captions else \
            torch.zeros(0, image_embeds.shape[1])
        gathered = _gather([image_embeds, text_embeds, torch.tensor(owners, dtype=torch.long)])
        offsets = [0]
        for part in gathered:
            offsets.append(offsets[-1] + len(part[0]))
        if not offsets[-1]:
            raise ValueError(f"{benchmark.name}: no samples in {', '.join(benchmark.shards)}.")
        return clip_benchmark_recall(torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered]),
                                 torch.cat([g[2] + offset for g, offset in zip(gathered, offsets)]), recall_k)
    finally:
        model.train(was_training)


def dataset_root(template: str, name: str) -> Path:
    """`--dataset_root` as clip_benchmark reads it: a folder, or a template with {dataset} (the name without wds/)
    or {dataset_cleaned} (that with / as -)."""
    short = name.removeprefix("wds/")
    return Path(template.format(dataset=short, dataset_cleaned=short.replace("/", "-")))


def results_record(benchmark: BenchmarkSet, model_name: str, metrics: dict) -> dict:
    """One result as clip_benchmark's CLI writes it."""
    return {"dataset": benchmark.name, "model": "lightclip", "pretrained": model_name, "task": benchmark.task,
            "metrics": metrics, "language": "en"}


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "A saved LightCLIP model: folder or Hub id."})
    dataset: list[str] = field(default_factory=list, metadata={
        "help": "Benchmark sets, named as clip_benchmark names them (wds/NAME), found through --dataset_root."})
    dataset_root: str = field(default="wds_{dataset_cleaned}", metadata={
        "help": "The sets' folder: a path, or a template with {dataset} (wds/x/y -> x/y) or {dataset_cleaned} "
                "(-> x-y), as clip_benchmark's --dataset_root. Default: the folder names of the clip-benchmark "
                "datasets on the Hub (wds_imagenet1k, ...) in the working directory."})
    split: str = field(default="test", metadata={"help": "The shards' split folder."})
    recall_k: list[int] = field(default_factory=lambda: [1, 5, 10], metadata={"help": "k of retrieval recall@k."})
    batch_size: int = field(default=64)
    output: str = field(default="{dataset}_lightclip_{task}.json", metadata={
        "help": "Results file per set (clip_benchmark's JSON), a template with {dataset} (wds/x/y -> x_y), {task} "
                "and {model}, as clip_benchmark's --output."})
    device: str | None = field(default=None, metadata={"help": "cuda, cpu, ... (default: this process's device)."})


def _parse(argv=None) -> EvalArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(EvalArguments, prog="lightclip-eval", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    args, data_flags = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if data_flags and not data_flags[0].startswith("--"):
        parser.error(f"unexpected {data_flags[0]!r}: benchmark sets go after --dataset, data flags are --name value.")
    if not args.dataset and not data_flags:
        parser.error("name what to score: benchmark sets (--dataset wds/NAME ..., found through --dataset_root) "
                     "and/or data as the trainer reads it (--validation_file FILE, --dataset_name NAME, ...).")
    return args, data_flags


def evaluate_trainer_source(model: str, data_flags: list[str], batch_size: int) -> dict:
    """The trainer's own evaluation (`lightclip-train --do_train false`) of data given with its flags: zero-shot
    top-1/5 when the data has labels, retrieval R@1/5/10 both ways."""
    import tempfile

    import train_lightclip

    with tempfile.TemporaryDirectory() as out:
        train_lightclip.main(["--model_name_or_path", model, "--do_train", "false", *data_flags, "--output_dir", out,
                              "--per_device_eval_batch_size", str(batch_size), "--report_to", "none"])
        metrics = json.loads((Path(out) / "eval_results.json").read_text())
    return {key.removeprefix("eval_"): value for key, value in metrics.items()
            if key not in ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "epoch")}


def main(argv=None) -> int:
    """`lightclip-eval`: a problem with the model folder, a set or the data is one `error:` line and exit 2
    (`LIGHTCLIP_TRACEBACK=1` shows the traceback)."""
    import os
    import sys

    from .processes import end_processes

    try:
        status = _main(argv)
    except ValueError as err:
        if os.environ.get("LIGHTCLIP_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    end_processes()
    return status


def _main(argv=None) -> int:
    from modeling_lightclip import LightCLIPModel

    from .packaged_weights import check_saved_model
    from .processes import process_state

    args, data_flags = _parse(argv)
    processor = check_saved_model(args.model, "--model")
    sets = [open_benchmark(dataset_root(args.dataset_root, name), name, args.split) for name in args.dataset]
    state = process_state()
    if data_flags:
        metrics = evaluate_trainer_source(args.model, data_flags, args.batch_size)
        if state.is_main_process:
            source = " ".join(data_flags)
            out = Path(args.output.format(dataset="data", task="validation", model="lightclip"))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"dataset": source, "model": "lightclip", "pretrained": args.model,
                                       "task": "validation", "metrics": metrics, "language": "en"}, indent=2))
            print(f"{source}: " + ", ".join(f"{key} {value:.4g}" for key, value in metrics.items()) + f"  -> {out}")
    model = LightCLIPModel.from_pretrained(args.model).to(args.device or state.device).eval()
    for benchmark in sets:
        metrics = evaluate_benchmark(model, processor, benchmark, args.batch_size, tuple(args.recall_k))
        if state.is_main_process:
            out = Path(args.output.format(dataset=benchmark.slug, task=benchmark.task, model="lightclip"))
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results_record(benchmark, args.model, metrics), indent=2))
            print(f"{benchmark.name} ({benchmark.task}): "
                  + ", ".join(f"{key} {100 * value:.2f}" for key, value in metrics.items()) + f"  -> {out}")
    return 0


__all__ = ["BenchmarkSet", "classification_metrics", "evaluate_benchmark", "open_benchmark", "results_record",
           "clip_benchmark_recall"]


if __name__ == "__main__":
    raise SystemExit(main())
