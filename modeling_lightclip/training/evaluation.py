"""Zero-shot classification and image<->text retrieval for LightCLIP (training side; not remote code).

Embeddings are computed batch by batch (sharded across processes and gathered under accelerate); the scores go
through the local `evaluate` modules in `metrics/` beside this file. Keys follow the Trainer's `eval_` prefix:
`zero_shot_top1`, `zero_shot_top5`, `image_to_text_r{1,5,10}`, `text_to_image_r{1,5,10}`.
"""

from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F


METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def load_metric(name: str):
    import evaluate

    return evaluate.load(str(METRICS_DIR / name))


@torch.no_grad()
def embed_pairs(model, dataloader, accelerator=None, skipped: Counter | None = None):
    """(image embeddings, text embeddings, caption token ids, class labels or None) of every pair the collator
    keeps; embeddings normalised, on CPU. `model` is the `LightCLIPModel` itself (unwrapped by the caller).
    With several processes (`accelerator`), `dataloader` reads this process's own share of the rows (no sample twice:
    `split_dataset_by_node`) and every process gets all of them, in process order; the processes may keep different
    numbers of pairs (bad samples are skipped where they are). `skipped`, when given, receives the collator's counts
    of the samples it dropped, read from the batches (so they are right with loader workers) and summed over
    processes."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    images, texts, ids, labels = [], [], [], []
    local_skips = Counter()
    for batch in dataloader:
        local_skips.update(batch.get("skipped") or {})
        if "pixel_values" not in batch:  # every sample of this batch was bad (counted by the collator)
            continue
        pixel_values = batch["pixel_values"].to(device)
        input_ids, attention_mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        images.append(F.normalize(model.get_image_features(pixel_values=pixel_values).pooler_output.float(),
                                  dim=-1).cpu())
        texts.append(F.normalize(model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
                                 .pooler_output.float(), dim=-1).cpu())
        ids.extend(tuple(row[mask.bool()].tolist()) for row, mask in zip(input_ids.cpu(), attention_mask.cpu()))
        if batch.get("class_labels") is not None:
            labels.append(batch["class_labels"].cpu())
    model.train(was_training)
    if accelerator is not None and accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([(images, texts, ids, labels)])  # one entry per process, in process order
        images = [t for part in parts for t in part[0]]
        texts = [t for part in parts for t in part[1]]
        ids = [row for part in parts for row in part[2]]
        labels = [t for part in parts for t in part[3]]
    if skipped is not None:
        skipped.update(sum_over_processes(local_skips, accelerator))
    if not images:
        raise ValueError("no valid image-caption pair in the evaluation data")
    return torch.cat(images), torch.cat(texts), ids, (torch.cat(labels) if labels else None)


def sum_over_processes(counts: Counter, accelerator=None) -> Counter:
    """Counts summed over the processes of `accelerator` (every process gets the total); a copy with one process."""
    if accelerator is None or accelerator.num_processes == 1:
        return Counter(counts)
    from accelerate.utils import gather_object

    total = Counter()
    for part in gather_object([dict(counts)]):
        total.update(part)
    return total


@torch.no_grad()
def class_text_embeddings(model, tokenizer, class_names: list[str], templates: list[str]) -> torch.Tensor:
    """CLIP's prompt ensemble: the normalised mean of each class's template embeddings. (C, D) on CPU. `model` is
    the `LightCLIPModel` itself (unwrapped by the caller)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    rows = []
    for name in class_names:
        enc = tokenizer([t.format(name) for t in templates], padding=True, truncation=True, return_tensors="pt")
        emb = model.get_text_features(input_ids=enc["input_ids"].to(device),
                                      attention_mask=enc["attention_mask"].to(device)).pooler_output.float()
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(0), dim=-1))
    model.train(was_training)
    return torch.stack(rows).cpu()


def zero_shot_metrics(image_embeds: torch.Tensor, labels: torch.Tensor, class_embeds: torch.Tensor) -> dict:
    """Top-1/top-5 over the labelled images; images labelled -1 (no label) are left out and counted."""
    labelled = labels >= 0
    out = {"zero_shot_unlabelled": int((~labelled).sum())} if not bool(labelled.all()) else {}
    if not bool(labelled.any()):
        return out
    ranked = (image_embeds[labelled] @ class_embeds.t()).argsort(dim=1, descending=True)[:, :5]
    result = load_metric("zero_shot_accuracy").compute(predictions=ranked.tolist(),
                                                       references=labels[labelled].tolist(), top_k=[1, 5])
    return {"zero_shot_top1": result["top1"], "zero_shot_top5": result["top5"], **out}


def _rankings(image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: list | None, top: int):
    """The ranked candidates and relevant sets of both directions. Identical captions (same token ids) are one
    gallery entry: image->text ranks the *distinct* captions, text->image queries each distinct caption once,
    relevant to every image it describes. Returns (i2t ranked, i2t relevant, t2i ranked, t2i relevant)."""
    n = image_embeds.shape[0]
    keys = captions if captions is not None else list(range(n))
    index: dict = {}
    first = []
    caption_of = []
    for i, key in enumerate(keys):
        if key not in index:
            index[key] = len(first)
            first.append(i)
        caption_of.append(index[key])
    gallery = text_embeds[first]                                       # (U, D) distinct captions
    images_of = [[] for _ in first]
    for i, u in enumerate(caption_of):
        images_of[u].append(i)
    similarity = image_embeds @ gallery.t()                            # (N, U)
    i2t = similarity.topk(min(top, len(first)), dim=1).indices.tolist()
    t2i = similarity.t().topk(min(top, n), dim=1).indices.tolist()
    return i2t, [[u] for u in caption_of], t2i, images_of


def retrieval_metrics(image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: list | None = None,
                      ks=(1, 5, 10)) -> dict:
    """R@k both ways for paired embeddings (row i of each is one pair).

    Identical captions (same token ids) are one gallery entry (`_rankings`), so data with repeated captions
    (class-name templates) is not scored on how ties between copies of one caption happen to be broken; with
    distinct captions this is the usual pairwise recall.
    """
    i2t, i2t_relevant, t2i, t2i_relevant = _rankings(image_embeds, text_embeds, captions, max(ks))
    metric = load_metric("retrieval_recall")
    a = metric.compute(predictions=i2t, references=i2t_relevant, k=list(ks))
    b = metric.compute(predictions=t2i, references=t2i_relevant, k=list(ks))
    out = {f"image_to_text_r{k}": a[f"r{k}"] for k in ks}
    out.update({f"text_to_image_r{k}": b[f"r{k}"] for k in ks})
    return out


def retrieval_hits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, captions: list | None = None,
                   ks=(1, 5)) -> dict:
    """Per query, whether it is retrieved at k (1/0), for `image_to_text_r{k}` (one query per image) and
    `text_to_image_r{k}` (one per distinct caption): the items a paired bootstrap resamples. Their means are
    `retrieval_metrics`."""
    i2t, i2t_relevant, t2i, t2i_relevant = _rankings(image_embeds, text_embeds, captions, max(ks))
    out = {}
    for direction, ranked, relevant in (("image_to_text", i2t, i2t_relevant), ("text_to_image", t2i, t2i_relevant)):
        for k in ks:
            out[f"{direction}_r{k}"] = [int(any(c in set(rel) for c in row[:k])) for row, rel in zip(ranked, relevant)]
    return out


def zero_shot_hits(image_embeds: torch.Tensor, labels: torch.Tensor, class_embeds: torch.Tensor) -> list[int]:
    """Per labelled image, whether zero-shot top-1 is its class (1/0): the items of a paired bootstrap."""
    labelled = labels >= 0
    predicted = (image_embeds[labelled] @ class_embeds.t()).argmax(dim=1)
    return (predicted == labels[labelled]).int().tolist()


__all__ = ["class_text_embeddings", "embed_pairs", "load_metric", "retrieval_hits", "retrieval_metrics",
           "sum_over_processes", "zero_shot_hits", "zero_shot_metrics"]
