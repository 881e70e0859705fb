"""Why do the LightCLIP objectives not help? Diagnostics measured while training, before any tuning.

    python benchmarks/diagnose_objectives.py                     # the ablation's cpu setting, 250 steps
    python benchmarks/diagnose_objectives.py --steps 100 --every 20 --json benchmarks/results/diagnosis_cpu.json

One model with every objective on (progressive soft labels, token alignment, MLM + fusion, CLIP-PING NN + XNN with
the memory bank), trained on the ablation's data (`benchmarks/ablation.py` prepares it) with its schedule. Every
`--every` steps, on the batch about to be trained on:

1. **Gradient share on the shared parameters.** Each weighted term's gradient alone (autograd.grad), on four
   groups the terms compete for: image tower, text tower, the two projections, the logit scale. Printed: each
   term's share of the summed gradient norms, and the cosine between its gradient and the instance loss's (< 0:
   the term pulls against the retrieval objective).
2. **CLIP-PING's positives vs negatives.** The bank entries of the drawn neighbours vs the same neighbours encoded
   now (cosine = how stale the bank is), and how often the positive wins among the candidates (top-1) with the
   stale bank and with fresh embeddings, and the positive-minus-mean-negative logit gap.
3. **MLM and the word embeddings.** Mean pairwise cosine of the word embeddings of the 500 most frequent tokens
   (anisotropy) and of the text embeddings of a fixed caption set, for this model and for a CLIP-only model
   trained on the same batches (`--skip_clip_reference` leaves that out).

After training, on Fashion-MNIST test images (the garment fills the middle of a black background):

4. **Do the Hungarian matches mean anything?** Share of matched patches that lie on the garment (pixels off the
   background) vs the share of garment patches (chance), split by class-name words and template words, for the
   trained model and for the same architecture untrained.
"""

import argparse
import json
import math
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GROUPS = ("vision_model", "text_model", "projection", "logit_scale")


def _group(name: str) -> str | None:
    if name.startswith("vision_model."):
        return "vision_model"
    if name.startswith("text_model."):
        return "text_model"
    if name.startswith(("visual_projection.", "text_projection.")):
        return "projection"
    if name == "logit_scale":
        return "logit_scale"
    return None


def gradient_report(model, batch: dict) -> dict:
    """Per weighted term: gradient norm per parameter group and cosine to the instance term's gradient."""
    named = [(n, p) for n, p in model.named_parameters() if _group(n) is not None and p.requires_grad]
    params = [p for _, p in named]
    out = model(**batch, return_loss=True)
    weights = {"instance": 1.0, **model.config.loss_weights()}
    grads = {}
    for term, value in out.losses.items():
        if term not in weights:
            continue
        g = torch.autograd.grad(weights[term] * value, params, retain_graph=True, allow_unused=True)
        grads[term] = {group: torch.cat([(gi if gi is not None else torch.zeros_like(p)).flatten()
                                         for (n, p), gi in zip(named, g) if _group(n) == group])
                       for group in GROUPS}
    report = {}
    for term, by_group in grads.items():
        report[term] = {}
        for group, vector in by_group.items():
            reference = grads["instance"][group]
            cosine = F.cosine_similarity(vector, reference, dim=0).item() if vector.norm() > 0 else 0.0
            report[term][group] = {"norm": vector.norm().item(), "cosine_to_instance": cosine}
    for group in GROUPS:
        total = sum(report[t][group]["norm"] for t in report) or 1.0
        for term in report:
            report[term][group]["share"] = report[term][group]["norm"] / total
    return report


@torch.no_grad()
def ping_report(model, batch: dict, dataset, eval_collator, device) -> dict:
    """Stale bank vs fresh neighbour embeddings for the drawn image-space neighbours (NN: image -> text)."""
    ping = model.objectives.ping
    ids = batch["image_neighbour_ids"]
    stale, valid = ping.bank.lookup(ids.to(device), "text")
    if valid.sum() < 2:
        return {}
    keep = valid.nonzero().flatten()
    rows = eval_collator([dataset[int(i)] for i in ids[keep].tolist()])
    fresh = F.normalize(model.get_text_features(input_ids=rows["input_ids"].to(device),
                                                attention_mask=rows["attention_mask"].to(device)).pooler_output, dim=-1)
    was = model.training
    model.eval()
    images = F.normalize(model.get_image_features(pixel_values=batch["pixel_values"][keep].to(device)).pooler_output,
                         dim=-1)
    model.train(was)
    stale = stale[keep]
    scale = model.logit_scale.exp()
    result = {"bank_vs_fresh_cosine": F.cosine_similarity(stale, fresh, dim=-1).mean().item(),
              "usable_rows": int(keep.numel())}
    target = torch.arange(keep.numel(), device=device)
    for name, candidates in (("bank", stale), ("fresh", fresh)):
        logits = scale * images @ candidates.t()
        result[f"top1_{name}"] = (logits.argmax(1) == target).float().mean().item()
        positive = logits.diag()
        negative = (logits.sum(1) - positive) / max(keep.numel() - 1, 1)
        result[f"gap_{name}"] = (positive - negative).mean().item()
    return result


@torch.no_grad()
def embedding_geometry(model, tokenizer, frequent_ids: list[int], captions: list[str], device) -> dict:
    words = F.normalize(model.text_model.get_input_embeddings().weight[frequent_ids].float(), dim=-1)
    n = words.shape[0]
    word_cos = ((words @ words.t()).sum() - n) / (n * (n - 1))
    enc = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
    text = F.normalize(model.get_text_features(input_ids=enc["input_ids"].to(device),
                                               attention_mask=enc["attention_mask"].to(device)).pooler_output, dim=-1)
    m = text.shape[0]
    text_cos = ((text @ text.t()).sum() - m) / (m * (m - 1))
    return {"word_embedding_mean_cosine": word_cos.item(), "text_embedding_mean_cosine": text_cos.item()}


@torch.no_grad()
def match_report(model, files: dict, processor, limit: int, device) -> dict:
    """Share of matched patches on the garment vs chance, on Fashion-MNIST test images with template captions."""
    from datasets import load_dataset

    from modeling_lightclip.training.data import load_image
    from offline_data import CAPTION_TEMPLATES, FASHION_MNIST_CLASSES

    fm = load_dataset("parquet", data_files=str(files["zero_shot"]), split="train").select(range(limit))
    was = model.training
    model.eval()
    class_words = {tid for name in FASHION_MNIST_CLASSES for tid in processor.tokenizer(name, add_special_tokens=False)["input_ids"]}
    counts = Counter()
    stage = model.config.vision_token_stage
    for start in range(0, limit, 64):
        rows = fm[start:start + 64]
        images = [load_image(v) for v in list(rows["image"])]
        captions = [CAPTION_TEMPLATES[(start + i) % len(CAPTION_TEMPLATES)].format(FASHION_MNIST_CLASSES[label])
                    for i, label in enumerate(list(rows["label"]))]
        pixels = processor.image_processor(images, return_tensors="pt")["pixel_values"].to(device)
        enc = processor.tokenizer(captions, padding=True, return_tensors="pt")
        out = model(input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    pixel_values=pixels, output_tokens=True, return_dict=True)
        vision = model.vision_model(pixel_values=pixels, output_hidden_states=True, return_dict=True)
        tokens = out.image_tokens if stage is None else vision.hidden_states[stage].flatten(2).transpose(1, 2)
        word_mask = out.text_word_mask
        matches = model.objectives.token(tokens, out.text_tokens, word_mask, return_matches=True)["matches"].cpu()
        side = int(math.isqrt(tokens.shape[1]))
        # garment patches: any pixel off the (constant) background value of the normalised image
        background = pixels[:, :, 0, 0].view(pixels.shape[0], -1, 1, 1)
        off = (pixels - background).abs().amax(1, keepdim=True) > 0.05
        on_garment = F.adaptive_max_pool2d(off.float(), side).flatten(1).bool().cpu()  # (B, P)
        ids = enc["input_ids"]
        for b in range(ids.shape[0]):
            counts["patches"] += on_garment.shape[1]
            counts["garment_patches"] += int(on_garment[b].sum())
            for position in (matches[b] >= 0).nonzero().flatten().tolist():
                kind = "class_word" if int(ids[b, position]) in class_words else "template_word"
                counts[f"{kind}_matches"] += 1
                counts[f"{kind}_on_garment"] += int(on_garment[b, int(matches[b, position])])
    model.train(was)
    chance = counts["garment_patches"] / max(counts["patches"], 1)
    return {"chance_on_garment": chance,
            **{f"{kind}_on_garment": counts[f"{kind}_on_garment"] / max(counts[f"{kind}_matches"], 1)
               for kind in ("class_word", "template_word")},
            "matches": counts["class_word_matches"] + counts["template_word_matches"]}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--data_dir", default=str(ROOT / "outputs" / "ablation" / "data"))
    parser.add_argument("--match_images", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip_clip_reference", action="store_true")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from datasets import load_dataset
    from torch.utils.data import DataLoader
    from transformers import get_cosine_schedule_with_warmup

    import ablation
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.neighbours import NeighbourTable
    from modeling_lightclip.training.preprocessing import build_processor, load_tokenizer
    from modeling_lightclip.training.recipes import build_model_config, load_recipe
    from modeling_lightclip.training.optimizer_groups import decay_parameter_names

    data_dir = Path(args.data_dir)
    files = ablation.prepare_data(data_dir, None, None)
    setting = ablation.SETTINGS["cpu"]
    tokenizer = load_tokenizer(str(ablation.prepare_tokenizer(data_dir, files["train"], setting["vocab_size"], 32)), 32)
    neighbours_dir = ablation.prepare_neighbours(data_dir, files["train"], args.image_size)
    train = load_dataset("parquet", data_files=str(files["train"]), split="train")
    train = train.add_column("sample_id", list(range(len(train))))
    recipe = load_recipe("default")
    fields = dict(image_size=args.image_size, soft_label_mode="similarity", token_loss_weight=0.5,
                  mlm_loss_weight=0.5, ping_nn_loss_weight=0.5, ping_xnn_loss_weight=0.5, ping_negatives="bank",
                  ping_bank_size=len(train))
    device = torch.device("cpu")
    processor = build_processor(args.image_size, tokenizer)

    def _build(**overrides):
        torch.manual_seed(0)
        model = LightCLIPModel(build_model_config(recipe["model"], tokenizer, **{**fields, **overrides})).train()
        decay = set(decay_parameter_names(model))
        groups = [{"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": 0.1},
                  {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0}]
        optimiser = torch.optim.AdamW(groups, lr=args.learning_rate)
        schedule = get_cosine_schedule_with_warmup(optimiser, int(0.1 * args.steps), args.steps)
        return model, optimiser, schedule

    model, optimiser, schedule = _build()
    untrained = LightCLIPModel(model.config).eval()
    untrained.load_state_dict(model.state_dict())
    reference = None if args.skip_clip_reference else _build(
        soft_label_mode="none", token_loss_weight=0.0, mlm_loss_weight=0.0, ping_nn_loss_weight=0.0,
        ping_xnn_loss_weight=0.0)
    collator = ImageTextCollator(processor, train=True, seed=0, neighbours=NeighbourTable(neighbours_dir, len(train)),
                                 model_config=model.config)
    eval_collator = ImageTextCollator(processor, train=False)
    loader = DataLoader(train, batch_size=args.batch_size, shuffle=True, drop_last=True, collate_fn=collator,
                        generator=torch.Generator().manual_seed(0))
    counts = Counter(t for ids in tokenizer(list(train.select(range(5000))["caption"]), add_special_tokens=False)["input_ids"]
                     for t in ids)
    frequent = [t for t, _ in counts.most_common(500)]
    probe_captions = list(load_dataset("parquet", data_files=str(files["retrieval"]), split="train")["caption"])[:256]

    history = []
    step = 0
    while step < args.steps:
        for batch in loader:
            if step >= args.steps:
                break
            batch.pop("return_loss", None)
            batch.pop("skipped", None)
            model.set_training_progress(step / args.steps)
            if step % args.every == 0 or step == args.steps - 1:
                entry = {"step": step, "gradients": gradient_report(model, batch),
                         "ping": ping_report(model, batch, train, eval_collator, device),
                         "geometry": embedding_geometry(model, tokenizer, frequent, probe_captions, device)}
                if reference is not None:
                    entry["geometry_clip"] = embedding_geometry(reference[0], tokenizer, frequent, probe_captions, device)
                history.append(entry)
                shares = {t: round(v["text_model"]["share"], 2) for t, v in entry["gradients"].items()}
                cosines = {t: round(v["text_model"]["cosine_to_instance"], 2) for t, v in entry["gradients"].items()}
                print(f"step {step}: text-tower share {shares} cos-to-instance {cosines} ping {entry['ping']}",
                      flush=True)
            out = model(**batch, return_loss=True)
            out.loss.backward()
            optimiser.step()
            schedule.step()
            optimiser.zero_grad(set_to_none=True)
            model.clamp_logit_scale_()
            if reference is not None:
                ref_model, ref_optimiser, ref_schedule = reference
                plain = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
                ref_model(**plain, return_loss=True).loss.backward()
                ref_optimiser.step()
                ref_schedule.step()
                ref_optimiser.zero_grad(set_to_none=True)
                ref_model.clamp_logit_scale_()
            step += 1

    matches = {"trained": match_report(model, files, processor, args.match_images, device),
               "untrained": match_report(untrained, files, processor, args.match_images, device)}
    result = {"settings": vars(args), "history": history, "matches": matches}
    print(json.dumps(summarise(result), indent=2))
    if args.json:
        from results_file import write_results

        write_results(args.json, result)
    return result


def summarise(result: dict) -> dict:
    """Mean over the recorded steps of each term's share and cosine on each group; the first and last PING and
    geometry figures; the match rates."""
    history = result["history"]
    terms = list(history[0]["gradients"])
    summary = {"gradient": {}}
    for term in terms:
        summary["gradient"][term] = {
            group: {"share": round(statistics.fmean(h["gradients"][term][group]["share"] for h in history), 3),
                    "cosine_to_instance": round(statistics.fmean(h["gradients"][term][group]["cosine_to_instance"]
                                                                 for h in history), 3)}
            for group in GROUPS}
    pings = [h for h in history if h["ping"]]
    if pings:
        summary["ping_first"], summary["ping_last"] = pings[0]["ping"], pings[-1]["ping"]
    summary["geometry_last"] = history[-1]["geometry"]
    if "geometry_clip" in history[-1]:
        summary["geometry_clip_last"] = history[-1]["geometry_clip"]
    summary["matches"] = result["matches"]
    return summary


if __name__ == "__main__":
    main()
