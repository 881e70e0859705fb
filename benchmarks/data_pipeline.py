"""Data-pipeline throughput: images/s for decode + augment + image processor + tokenise + collate.

    python benchmarks/data_pipeline.py --workers 0 1 2 --batches 40
    python benchmarks/data_pipeline.py --photo_size 4032x3024 --image_size 224 --uint8 --workers 0 --batches 4 \
        --batch_size 32 --compare_jpeg_draft          # phone-sized JPEGs: reduced vs full decoding

Runs the training collator over the embedded Fashion-MNIST parquet (or --train_file) through a torch DataLoader
with each worker count; prints the median images/s over --repeats passes and images/s per worker (0 workers =
the main process). Model-free: this is the input side of a training step only. `--photo_size WxH` replaces the data
with JPEG re-encodes of the two test photos scaled to that size (real content at a camera's pixel count);
`--compare_jpeg_draft` runs each worker count with reduced JPEG decoding on and off.
"""

import argparse
import statistics
import time

import torch
from torch.utils.data import DataLoader

from modeling_lightclip.training.data import DataArguments, ImageTextCollator, load_image_text_datasets
from modeling_lightclip.training.preprocessing import build_processor, train_wordpiece_tokenizer


def _photo_dataset(photo_size: str, n: int):
    """n JPEGs (quality 90) of the repository's two test photos scaled to WxH, with captions."""
    import io
    from pathlib import Path

    from datasets import Dataset, Features, Image as ImageFeature, Value
    from PIL import Image

    width, height = (int(v) for v in photo_size.lower().split("x"))
    fixtures = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
    encoded = []
    for name in ("astronaut.jpg", "chelsea_cat.jpg"):
        buffer = io.BytesIO()
        Image.open(fixtures / name).convert("RGB").resize((width, height), Image.Resampling.BICUBIC).save(
            buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    captions = ["a photo of an astronaut", "a photo of a cat"]
    features = Features({"image": ImageFeature(decode=False), "caption": Value("string")})  # as a training run reads
    return Dataset.from_dict({"image": [{"bytes": encoded[i % 2], "path": None} for i in range(n)],
                              "caption": [captions[i % 2] for i in range(n)]}, features=features)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train_file")
    parser.add_argument("--image_size", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uint8", action="store_true", help="uint8 images (normalised on the device in training)")
    parser.add_argument("--photo_size", help="WxH: photo-sized JPEGs instead of the data (see above)")
    parser.add_argument("--compare_jpeg_draft", action="store_true", help="reduced JPEG decoding on and off")
    parser.add_argument("--json", help="also write the figures here")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if args.photo_size:
        data = _photo_dataset(args.photo_size, args.batch_size * args.batches)
    else:
        data = load_image_text_datasets(DataArguments(train_file=args.train_file, max_train_samples=args.batch_size
                                                      * args.batches))["train"]
    tokenizer = train_wordpiece_tokenizer(data.select_columns(["caption"])["caption"], 1000, 32)
    print(f"{len(data)} samples, batch {args.batch_size}, {args.image_size}px, augmentation on, "
          f"{'uint8' if args.uint8 else 'float'} images")
    results = {"setting": vars(args) | {"samples": len(data)}, "runs": []}
    for workers, draft in [(w, d) for w in args.workers for d in ((True, False) if args.compare_jpeg_draft else (True,))]:
        collator = ImageTextCollator(build_processor(args.image_size, tokenizer), train=True, uint8_images=args.uint8,
                                     jpeg_draft_decoding=draft)
        rates = []
        for _ in range(args.repeats):
            loader = DataLoader(data, batch_size=args.batch_size, shuffle=True, collate_fn=collator,
                                num_workers=workers, drop_last=True)
            start = time.perf_counter()
            images = sum(batch["pixel_values"].shape[0] for batch in loader)
            rates.append(images / (time.perf_counter() - start))
        rate = statistics.median(rates)
        results["runs"].append({"workers": workers, "jpeg_draft": draft, "images_per_s": rate,
                                "ms_per_image_per_worker": 1000 / (rate / max(workers, 1))})
        print(f"workers={workers} jpeg_draft={draft}: {rate:8.0f} images/s  ({rate / max(workers, 1):.0f} per worker, "
              f"{1000 / (rate / max(workers, 1)):.2f} ms per image)")

    if args.json:
        from results_file import write_results

        write_results(args.json, results)


if __name__ == "__main__":
    main()
