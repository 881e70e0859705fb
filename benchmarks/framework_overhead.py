"""LightCLIP's CLIP-only training step vs transformers' `CLIPModel` with identical dimensions, trained the same way;
and inference parity: the LightCLIP inference path vs a plain dual encoder built from the same towers.

    python benchmarks/framework_overhead.py --steps 12

Both models: CLIP vision tower (ViT, patch 16) + CLIP text tower, same sizes, same projection, same batch, AdamW,
forward + backward + step; LightCLIP with the extra objectives off (soft labels none, token 0, MLM 0). Arms run
interleaved; medians over --steps timed steps. Targets: training step ratio <= 1.00x; inference
latency and parameter count of the LightCLIP inference path equal to the plain dual encoder's.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPConfig, CLIPModel

from modeling_lightclip import LightCLIPConfig, LightCLIPModel
from modeling_lightclip.training.hub import median_ms


class PlainDualEncoder(nn.Module):
    """The reference inference path: the same two towers, pooled by their poolers, two projections."""

    def __init__(self, model: LightCLIPModel):
        super().__init__()
        self.vision_model, self.text_model = model.vision_model, model.text_model
        self.visual_projection, self.text_projection = model.visual_projection, model.text_projection

    def forward(self, pixel_values, input_ids, attention_mask):
        image = self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)
        text = self.text_projection(self.text_model(input_ids=input_ids, attention_mask=attention_mask).pooler_output)
        return F.normalize(image, dim=-1), F.normalize(text, dim=-1)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--vision_layers", type=int, default=6)
    parser.add_argument("--vision_width", type=int, default=192)
    parser.add_argument("--text_layers", type=int, default=4)
    parser.add_argument("--text_width", type=int, default=256)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--seq_len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    vision = {"image_size": args.image_size, "patch_size": 16, "hidden_size": args.vision_width,
              "num_hidden_layers": args.vision_layers, "num_attention_heads": max(args.vision_width // 64, 1),
              "intermediate_size": 4 * args.vision_width}
    text = {"vocab_size": 8192, "hidden_size": args.text_width, "num_hidden_layers": args.text_layers,
            "num_attention_heads": max(args.text_width // 64, 1), "intermediate_size": 4 * args.text_width,
            "max_position_embeddings": 77, "eos_token_id": 3, "bos_token_id": 2, "pad_token_id": 0}
    torch.manual_seed(0)
    ours = LightCLIPModel(LightCLIPConfig(
        vision_config={"model_type": "clip_vision_model", **vision}, text_config={"model_type": "clip_text_model", **text},
        projection_dim=256, image_size=args.image_size, soft_label_mode="none", token_loss_weight=0.0,
        mlm_loss_weight=0.0)).train()
    theirs = CLIPModel(CLIPConfig(vision_config=vision, text_config=text, projection_dim=256)).train()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 8192, (args.batch_size, args.seq_len), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
             "pixel_values": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)}
    optimisers = {"lightclip": torch.optim.AdamW(ours.parameters(), lr=1e-4),
                  "clipmodel": torch.optim.AdamW(theirs.parameters(), lr=1e-4)}
    models = {"lightclip": ours, "clipmodel": theirs}

    def step(name):
        model = models[name]
        loss = model(**batch, return_loss=True).loss
        loss.backward()
        optimisers[name].step()
        optimisers[name].zero_grad(set_to_none=True)

    times = {name: [] for name in models}
    for i in range(args.warmup + args.steps):
        for name in models:  # interleaved
            start = time.perf_counter()
            step(name)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    ours_ms = 1000 * statistics.median(times["lightclip"])
    theirs_ms = 1000 * statistics.median(times["clipmodel"])
    print(f"train step (batch {args.batch_size}, {args.image_size}px, ViT {args.vision_layers}L-{args.vision_width} + "
          f"text {args.text_layers}L-{args.text_width}, {args.threads} threads):")
    print(f"  transformers CLIPModel   {theirs_ms:8.1f} ms")
    print(f"  LightCLIP (CLIP-only)    {ours_ms:8.1f} ms   ratio {ours_ms / theirs_ms:.3f}x")

    ours.eval()
    plain = PlainDualEncoder(ours).eval()
    single = {k: v[:1] for k, v in batch.items()}
    with torch.no_grad():
        image_ours = lambda: ours.get_image_features(pixel_values=single["pixel_values"])  # noqa: E731
        image_plain = lambda: plain.visual_projection(plain.vision_model(pixel_values=single["pixel_values"]).pooler_output)  # noqa: E731
        text_ours = lambda: ours.get_text_features(input_ids=single["input_ids"], attention_mask=single["attention_mask"])  # noqa: E731
        text_plain = lambda: plain.text_projection(plain.text_model(input_ids=single["input_ids"], attention_mask=single["attention_mask"]).pooler_output)  # noqa: E731
        results = {}
        for name, fn in (("image/lightclip", image_ours), ("image/plain", image_plain), ("text/lightclip", text_ours),
                         ("text/plain", text_plain)):
            results[name] = median_ms(fn, 4 * args.steps, args.warmup)
        a, b = ours(**single), plain(**single)
    inference_params = sum(p.numel() for n, p in ours.named_parameters() if not n.startswith("objectives."))
    plain_params = sum(p.numel() for p in plain.parameters())
    print("inference, batch 1 (median):")
    for modality in ("image", "text"):
        lc, pl = results[f"{modality}/lightclip"], results[f"{modality}/plain"]
        print(f"  {modality} encoder: LightCLIP {lc:.2f} ms, plain dual encoder {pl:.2f} ms, ratio {lc / pl:.3f}x")
    print(f"  parameters: LightCLIP inference path {inference_params:,}, plain dual encoder {plain_params:,}")
    identical = torch.equal(a.image_embeds, b[0]) and torch.equal(a.text_embeds, b[1])
    print(f"  embeddings identical: {identical}")
    if args.json:
        from results_file import write_results

        write_results(args.json, {"setting": vars(args), "clipmodel_step_ms": theirs_ms, "lightclip_step_ms": ours_ms,
                                  "step_ratio": ours_ms / theirs_ms, "inference_ms": results,
                                  "inference_params": inference_params, "plain_dual_encoder_params": plain_params,
                                  "embeddings_identical": identical})


if __name__ == "__main__":
    main()
