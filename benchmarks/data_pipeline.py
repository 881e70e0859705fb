"""Data-pipeline throughput: images/s for decode + augment + image processor + tokenise + collate.

    python benchmarks/data_pipeline.py --workers 0 1 2 --batches 40

Runs the training collator over the embedded Fashion-MNIST parquet (or --train_file) through a torch DataLoader
with each worker count; prints the median images/s over --repeats passes and images/s per worker (0 workers =
the main process). Model-free: this is the input side of a training step only.
"""

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader

from modeling_lightclip.training.data import DataArguments, ImageTextCollator, load_image_text_datasets
from modeling_lightclip.training.preprocessing import build_processor, train_wordpiece_tokenizer


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uint8", action="store_true", help="uint8 images (normalised on the device in training)")
    args = parser.parse_args()
    torch.set_num_threads(1)

    data = load_image_text_datasets(DataArguments(train_file=args.train_file, max_train_samples=args.batch_size
                                                  * args.batches))["train"]
    tokenizer = train_wordpiece_tokenizer(data.select_columns(["caption"])["caption"], 1000, 32)
    collator = ImageTextCollator(build_processor(args.image_size, tokenizer), train=True, uint8_images=args.uint8)
    print(f"{len(data)} samples, batch {args.batch_size}, {args.image_size}px, augmentation on, "
          f"{'uint8' if args.uint8 else 'float'} images")
    for workers in args.workers:
        rates = []
        for _ in range(args.repeats):
            loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                                num_workers=workers, drop_last=True)
            start = time.perf_counter()
            images = sum(batch["pixel_values"].shape[0] for batch in loader)
            rates.append(images / (time.perf_counter() - start))
        rate = statistics.median(rates)
        print(f"workers={workers}: {rate:8.0f} images/s  ({rate / max(workers, 1):.0f} per worker)")


if __name__ == "__main__":
    main()
