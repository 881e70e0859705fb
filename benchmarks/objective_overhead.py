"""Training-step time of each LightCLIP objective vs the CLIP-only step, same towers, same batch.

    python benchmarks/objective_overhead.py --recipe resnet18 --image_size 64 --batch_size 64

Arms run interleaved (round-robin) so machine noise hits them alike; figures are medians over --steps timed
steps after --warmup steps. Also reports the share of the full step spent solving the bipartite matching.
Targets: full step <= 1.20x the CLIP-only step; matching <= 5% of the full step; CLIP-PING adds
<= 10% to the step it is added to (the bank is pre-filled so every row has a seen neighbour).
"""

import argparse
import copy
import statistics
import time

import torch

from modeling_lightclip import LightCLIPModel
from modeling_lightclip import objectives_lightclip
from modeling_lightclip.training.preprocessing import train_wordpiece_tokenizer
from modeling_lightclip.training.recipes import build_model_config, load_recipe


CAPTIONS = [
    "a photo of an ankle boot made of brown leather with a low heel",
    "a grey pullover with long sleeves and a round neck on a white background",
    "a pair of blue denim trousers folded on a wooden table",
    "a black leather bag with a long strap and a silver buckle",
    "a red dress with short sleeves and a floral pattern",
    "a white sneaker with black laces seen from the side",
    "a striped shirt with a collar and buttons down the front",
    "a sandal with thin straps and a flat sole",
]

ARMS = {
    "clip": dict(soft_label_mode="none", token_loss_weight=0.0, mlm_loss_weight=0.0),
    "+soft_labels": dict(soft_label_mode="similarity", token_loss_weight=0.0, mlm_loss_weight=0.0),
    "+token": dict(soft_label_mode="none", token_loss_weight=0.5, mlm_loss_weight=0.0),
    "+mlm_fusion": dict(soft_label_mode="none", token_loss_weight=0.0, mlm_loss_weight=0.5),
    "full": dict(soft_label_mode="similarity", token_loss_weight=0.5, mlm_loss_weight=0.5),
    # MLM as the studies ran it (half the rows at 15%; the default is a quarter at 30%)
    "full_mlm_half_rows": dict(soft_label_mode="similarity", token_loss_weight=0.5, mlm_loss_weight=0.5,
                               mlm_batch_fraction=0.5, mlm_probability=0.15),
    "+ping": dict(soft_label_mode="none", token_loss_weight=0.0, mlm_loss_weight=0.0, ping_nn_loss_weight=0.5,
                  ping_xnn_loss_weight=0.5),
    "full+ping": dict(soft_label_mode="similarity", token_loss_weight=0.5, mlm_loss_weight=0.5,
                      ping_nn_loss_weight=0.5, ping_xnn_loss_weight=0.5),
    # the study's redesigned candidates
    "+frozen_soft": dict(soft_label_mode="similarity", soft_label_source="frozen", soft_label_modality="both",
                         soft_label_max=0.5, token_loss_weight=0.0, mlm_loss_weight=0.0),
    "+ping_in_batch": dict(soft_label_mode="none", token_loss_weight=0.0, mlm_loss_weight=0.0,
                           ping_nn_loss_weight=0.5, ping_xnn_loss_weight=0.5, ping_positives="in_batch"),
    "frozen_soft+relation": dict(soft_label_mode="similarity", soft_label_source="frozen",
                                 soft_label_modality="candidates", soft_label_max=0.3, token_loss_weight=0.0,
                                 mlm_loss_weight=0.0, relation_loss_weight=2.0),
    "frozen_soft+ping_in_batch": dict(soft_label_mode="similarity", soft_label_source="frozen",
                                      soft_label_modality="both", soft_label_max=0.5, token_loss_weight=0.0,
                                      mlm_loss_weight=0.0, ping_nn_loss_weight=0.25, ping_xnn_loss_weight=0.25,
                                      ping_positives="in_batch"),
}
FROZEN_DIMS = (1280, 384)  # EfficientNet-Lite0 and all-MiniLM-L6-v2 features, as the neighbour folder holds
BANK_SIZE = 10_000


class _MatchingTimer:
    """Wraps the assignment solver to time it (wall clock, synchronised on CUDA)."""

    def __init__(self):
        self.seconds = 0.0
        self._solve = objectives_lightclip.solve_word_patch_assignment

    def __enter__(self):
        def timed(*args, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = self._solve(*args, **kwargs)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            return result

        objectives_lightclip.solve_word_patch_assignment = timed
        return self

    def __exit__(self, *exc):
        objectives_lightclip.solve_word_patch_assignment = self._solve


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="resnet18")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--vision_token_stage", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (GPU)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    recipe = load_recipe(args.recipe)
    tokenizer = train_wordpiece_tokenizer(CAPTIONS * 8, vocab_size=2048, model_max_length=32)
    texts = [CAPTIONS[i % len(CAPTIONS)] for i in range(args.batch_size)]
    enc = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
             "pixel_values": torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator)}
    batch = {k: v.to(device) for k, v in batch.items()}
    ping_inputs = {"sample_ids": torch.randperm(BANK_SIZE, generator=generator)[:args.batch_size],
                   "image_neighbour_ids": torch.randint(0, BANK_SIZE, (args.batch_size,), generator=generator),
                   "text_neighbour_ids": torch.randint(0, BANK_SIZE, (args.batch_size,), generator=generator)}
    ping_inputs = {k: v.to(device) for k, v in ping_inputs.items()}
    pairs = torch.arange(args.batch_size) ^ 1  # rows (0,1), (2,3), ... are (anchor, neighbour) pairs
    extra_inputs = {
        "frozen": {"teacher_image_features": torch.nn.functional.normalize(
                       torch.randn(args.batch_size, FROZEN_DIMS[0], generator=generator), dim=-1).to(device),
                   "teacher_text_features": torch.nn.functional.normalize(
                       torch.randn(args.batch_size, FROZEN_DIMS[1], generator=generator), dim=-1).to(device)},
        "in_batch": {"ping_partner_rows": pairs.to(device),
                     "ping_partner_spaces": ((torch.arange(args.batch_size) // 2) % 2).to(device)},
    }

    def _inputs(model):
        read, extra = objectives_lightclip.training_targets_read(model.config), {}
        if "sample_ids" in read:  # CLIP-PING's bank
            extra.update(ping_inputs)
        elif "ping_partner_rows" in read:
            extra.update(extra_inputs["in_batch"])
        if "teacher_image_features" in read:
            extra.update(extra_inputs["frozen"])
        return extra

    models, optimisers = {}, {}
    base_state = None
    for arm, fields in ARMS.items():
        overrides = dict(fields, image_size=args.image_size, soft_label_schedule="constant", ping_bank_size=BANK_SIZE)
        if args.vision_token_stage is not None:
            overrides["vision_token_stage"] = args.vision_token_stage
        config = build_model_config(copy.deepcopy(recipe["model"]), tokenizer, **overrides)
        torch.manual_seed(0)
        model = LightCLIPModel(config).to(device).train()
        if base_state is None:
            base_state = {k: v for k, v in model.state_dict().items() if not k.startswith("objectives.")}
        model.load_state_dict(base_state, strict=False)  # same towers in every arm
        model.set_training_progress(1.0)
        if objectives_lightclip.NeighbourContrastiveLoss.enabled(config):
            dim = config.projection_dim
            model.objectives.ping.bank.load_state_dict({
                "image": torch.nn.functional.normalize(torch.randn(BANK_SIZE, dim), dim=-1).to(device),
                "text": torch.nn.functional.normalize(torch.randn(BANK_SIZE, dim), dim=-1).to(device),
                "valid": torch.ones(BANK_SIZE, dtype=torch.bool, device=device)})
        models[arm] = model
        optimisers[arm] = torch.optim.AdamW(model.parameters(), lr=1e-4)

    times = {arm: [] for arm in ARMS}
    matching = []
    for step in range(args.warmup + args.steps):
        for arm, model in models.items():
            with _MatchingTimer() as timer:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                    loss = model(**batch, **_inputs(model), return_loss=True).loss
                loss.backward()
                optimisers[arm].step()
                optimisers[arm].zero_grad(set_to_none=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - start
            if step >= args.warmup:
                times[arm].append(elapsed)
                if arm == "full":
                    matching.append(timer.seconds / elapsed)

    clip = statistics.median(times["clip"])
    num_tokens = models["full"].vision_shapes.num_tokens
    stage = models["full"].config.vision_token_stage
    if stage is not None:
        num_tokens = models["full"].vision_shapes.stage_num_tokens[stage]
    print(f"recipe={args.recipe} image_size={args.image_size} batch={args.batch_size} device={device} "
          f"threads={args.threads} bf16={args.bf16} patches={num_tokens} caption_tokens={batch['input_ids'].shape[1]}")
    print(f"{'arm':<26}{'median step (ms)':>18}{'vs clip':>10}")
    results = {}
    for arm in ARMS:
        median = statistics.median(times[arm])
        results[arm] = {"median_ms": 1000 * median, "ratio": median / clip}
        print(f"{arm:<26}{1000 * median:>18.1f}{median / clip:>9.2f}x")
    for with_ping, without in (("+ping", "clip"), ("full+ping", "full"), ("+ping_in_batch", "clip")):
        added = statistics.median(times[with_ping]) / statistics.median(times[without])
        results[f"ping_overhead_on_{without}"] = added
        print(f"{with_ping} vs {without}: {added:.3f}x")
    share = statistics.median(matching)
    results["matching_share_of_full_step"] = share
    print(f"matching share of the full step: {100 * share:.1f}% (median)")
    if args.json:
        from results_file import write_results

        results["setting"] = vars(args) | {"torch": torch.__version__, "caption_tokens": batch["input_ids"].shape[1]}
        write_results(args.json, results)


if __name__ == "__main__":
    main()
