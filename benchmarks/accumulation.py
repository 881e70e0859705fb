"""Peak memory and step time of contrastive accumulation: a batch of B rows computed in micro-batches of b vs in one
piece, same model, same objective.

    python benchmarks/accumulation.py                                    # CPU: 64 px, B 256 / 1024, b 64
    python benchmarks/accumulation.py --image_size 32 --batches 512 2048 8192 --micro 64 256 --threads 1 \
        --max_memory_gib 12 --cpu --json benchmarks/results/accumulation_cpu.json
    python benchmarks/accumulation.py --recipe resnet18 --image_size 224 --batches 512 2048 8192 \\
        --micro 64 256 --bf16 --json benchmarks/results/accumulation_gpu.json          # a GPU

Each (B, b) arm runs in a fresh subprocess, so its peak is its own: on CUDA `torch.cuda.max_memory_allocated` (after
the model is built: what the step adds shows as `peak - model`), on the CPU the process's peak resident set
(`ru_maxrss`) next to the same after building the model. A step is `ContrastiveAccumulation(b).step` with the images
on the host, moved a micro-batch at a time as the trainer does (one piece: the model's forward + backward, the images
on the device), then SGD; figures are medians over --steps timed steps after --warmup. An arm that runs out of memory
is reported as such (it is the point: one piece stops fitting before the micro-batched one does).
The objective is --objective: `clip`, `sigmoid`, `recommended` (soft labels from teacher features and relation
distillation; random stand-in features of the teachers' width ride with the batch) or `paper` (the papers' objectives
at once: student soft labels, token alignment, MLM with fusion on half the rows, CLIP-PING with in-batch pairs).
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


CAPTIONS = [
    "a photo of an ankle boot made of brown leather with a low heel",
    "a grey pullover with long sleeves and a round neck on a white background",
    "a pair of blue denim trousers folded on a wooden table",
    "a red dress with short sleeves and a floral pattern",
]
OBJECTIVES = {
    "clip": dict(soft_label_mode="none", token_loss_weight=0.0, mlm_loss_weight=0.0, relation_loss_weight=0.0),
    "sigmoid": dict(instance_loss="sigmoid", soft_label_mode="none", token_loss_weight=0.0, mlm_loss_weight=0.0,
                    relation_loss_weight=0.0),
    "recommended": dict(soft_label_mode="similarity", soft_label_source="frozen", soft_label_modality="candidates",
                        soft_label_max=0.3, token_loss_weight=0.0, mlm_loss_weight=0.0, relation_loss_weight=2.0),
    # the papers' objectives at once: student soft labels, token alignment, MLM with fusion, CLIP-PING in-batch
    "paper": dict(soft_label_mode="similarity", soft_label_source="student", soft_label_max=0.2,
                  token_loss_weight=0.5, mlm_loss_weight=0.5, mlm_batch_fraction=0.5, mlm_probability=0.15,
                  ping_nn_loss_weight=0.5, ping_xnn_loss_weight=0.5, ping_positives="in_batch",
                  relation_loss_weight=0.0),
}


def _peak_mib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_arm(args) -> dict:
    """One (batch, micro) arm in this process."""
    import torch

    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.objectives_lightclip import training_targets_from
    from modeling_lightclip.training.accumulation import ContrastiveAccumulation
    from modeling_lightclip.training.preprocessing import train_wordpiece_tokenizer
    from modeling_lightclip.training.recipes import build_model_config, load_recipe

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_memory_gib:  # a CPU arm that would not fit fails its allocation here instead of swapping the machine
        limit = int(args.max_memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    device = torch.device("cuda" if torch.cuda.is_available() and not args.cpu else "cpu")
    tokenizer = train_wordpiece_tokenizer(CAPTIONS * 8, vocab_size=512, model_max_length=32)
    config = build_model_config({**load_recipe(args.recipe)["model"], "image_size": args.image_size,
                                 **OBJECTIVES[args.objective]}, tokenizer)
    torch.manual_seed(0)
    model = LightCLIPModel(config).to(device).train()
    model.set_training_progress(0.5)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    rows, micro = args.batch, args.micro[0]
    text = tokenizer([CAPTIONS[i % len(CAPTIONS)] for i in range(rows)], padding=True, return_tensors="pt")
    # micro-batched, the images stay on the host and reach the device a micro-batch at a time, as in the trainer
    images = torch.randn(rows, 3, args.image_size, args.image_size)
    images = images.pin_memory() if device.type == "cuda" and micro < rows else images.to(device)
    batch = {"input_ids": text["input_ids"].to(device), "attention_mask": text["attention_mask"].to(device),
             "pixel_values": images}
    targets = {}
    if args.objective == "recommended":
        targets = {"teacher_image_features": torch.nn.functional.normalize(torch.randn(rows, 512, device=device), dim=-1),
                   "teacher_text_features": torch.nn.functional.normalize(torch.randn(rows, 384, device=device), dim=-1)}
    if args.objective == "paper":  # CLIP-PING's in-batch pairs: rows 2i and 2i + 1, found in the image space
        pairs = torch.arange(rows, device=device) ^ 1
        targets = {"ping_partner_rows": torch.where(pairs < rows, pairs, -1),
                   "ping_partner_spaces": torch.zeros(rows, dtype=torch.long, device=device)}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    model_mib = _peak_mib(device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else None
    to_device = lambda images: images.to(device, non_blocking=True)  # noqa: E731
    engine = ContrastiveAccumulation(micro, autocast=autocast, images_to_device=to_device) if micro < rows else None
    inputs = {**batch, "training_targets": training_targets_from(targets, {})}
    times = []
    try:
        for step in range(args.warmup + args.steps):
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            if engine is None:
                with autocast() if autocast else torch.autocast(device.type, enabled=False):
                    loss = model(**batch, training_targets=targets, return_loss=True).loss
                loss.backward()
            else:
                engine.step(model, inputs)
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - started)
    except (torch.OutOfMemoryError, MemoryError) as err:
        return {"out_of_memory": type(err).__name__, "model_mib": round(model_mib, 1)}
    except RuntimeError as err:  # the CPU allocator's refusal under --max_memory_gib
        if "allocate" not in str(err):
            raise
        return {"out_of_memory": "RuntimeError", "model_mib": round(model_mib, 1)}
    peak = _peak_mib(device)
    return {"median_step_s": round(statistics.median(times), 4), "samples_per_s": round(rows / statistics.median(times), 1),
            "peak_mib": round(peak, 1), "model_mib": round(model_mib, 1), "step_mib": round(peak - model_mib, 1)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="recommended")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    parser.add_argument("--micro", type=int, nargs="+", default=[64], help="micro-batch sizes; each batch also runs "
                                                                              "in one piece unless --no_one_piece")
    parser.add_argument("--no_one_piece", action="store_true", help="skip the one-piece arms (micro-batches only)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--cpu", action="store_true", help="stay on the CPU even when CUDA is available")
    parser.add_argument("--max_memory_gib", type=float, default=None, help="cap each arm's address space (CPU runs: "
                                                                           "an arm that would not fit reports "
                                                                           "out_of_memory)")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per arm")
    parser.add_argument("--json", help="also write the figures to this file")
    # one arm, in a subprocess of the above
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--arm", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.arm:
        print(json.dumps(run_arm(args)))
        return
    shared = ["--recipe", args.recipe, "--objective", args.objective, "--image_size", str(args.image_size),
              "--steps", str(args.steps), "--warmup", str(args.warmup)]
    shared += (["--threads", str(args.threads)] if args.threads else []) + (["--bf16"] if args.bf16 else [])
    shared += ["--cpu"] if args.cpu else []
    shared += ["--max_memory_gib", str(args.max_memory_gib)] if args.max_memory_gib else []
    results = {"recipe": args.recipe, "objective": args.objective, "image_size": args.image_size, "bf16": args.bf16,
               "steps": args.steps, "max_memory_gib": args.max_memory_gib, "arms": []}
    print(f"{args.recipe}, {args.objective} objective, {args.image_size} px; median step of {args.steps}:")
    for batch in args.batches:
        for micro in sorted({m for m in args.micro if m < batch} | (set() if args.no_one_piece else {batch})):
            command = [sys.executable, __file__, "--arm", "--batch", str(batch), "--micro", str(micro), *shared]
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
                figures = (json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else
                           {"failed": proc.stderr.strip().splitlines()[-1][:300] if proc.stderr.strip() else
                            f"exit {proc.returncode}"})
            except subprocess.TimeoutExpired:
                figures = {"timed_out": args.timeout}
            arm = {"batch": batch, "micro_batch": micro if micro < batch else None, **figures}
            results["arms"].append(arm)
            how = f"micro {micro:5d}" if micro < batch else "one piece "
            if "median_step_s" in figures:
                print(f"  batch {batch:6d} {how}: {figures['median_step_s'] * 1000:9.1f} ms/step "
                      f"{figures['samples_per_s']:8.1f} samples/s  peak {figures['peak_mib']:9.1f} MiB "
                      f"(step adds {figures['step_mib']:.1f})")
            else:
                print(f"  batch {batch:6d} {how}: {figures}")
    if args.json:
        from results_file import write_results

        write_results(args.json, results)
    if any("failed" in arm for arm in results["arms"]):
        sys.exit(1)


if __name__ == "__main__":
    main()
