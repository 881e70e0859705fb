"""Samples/s of the reinforce pass (`lightclip-reinforce`) and its disk cost, on generated JPEG pairs.

    python benchmarks/reinforce.py --samples 512 --json benchmarks/results/reinforce_cpu.json
    python benchmarks/reinforce.py --samples 256 --num_augmentations 0 4 8 \
        --teachers frozen-pair open_clip-vit-b-32 clip-vit-b-32 --json benchmarks/results/reinforce_views_cpu.json

Writes `--samples` JPEG image-caption pairs (photos re-encoded at `--photo_size`, captions of a few words), then
reinforces them with the default teacher (frozen-pair: EfficientNet-Lite0 at `--teacher_image_size` + all-MiniLM-L6-v2)
in one process, timing the whole pass (decode, both teachers, parquet writing); reports samples/s and the bytes the
copy takes per sample: the image bytes as stored in the source plus the float16 features (1,280 + 384 values; with
`--num_augmentations K` stored views, 1,280 per view, and the views' parameters). Several K are measured in one run,
one after the other on the same pairs, so their ratios compare. `--teachers`: the default pair, OpenCLIP's ViT-B-32
(`open_clip:local-dir:`, OpenCLIP's own preprocessing and tokenizer) and the same model converted to a transformers
`CLIPModel` folder (`open_clip_convert`), both from random weights: a teacher's cost is its architecture's, whatever
its weights (no download needed).
"""

import argparse
import io
import shutil
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--photo_size", default="320x240")
    parser.add_argument("--teacher_image_size", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--num_augmentations", type=int, nargs="+", default=[0],
                        help="stored views per image (each K measured in turn)")
    parser.add_argument("--teachers", nargs="+", default=["frozen-pair"],
                        choices=["frozen-pair", "open_clip-vit-b-32", "clip-vit-b-32"],
                        help="teachers measured in turn, each alone")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import torch
    from datasets import Dataset, Features, Image as ImageFeature, Value
    from PIL import Image

    from results_file import write_results
    from modeling_lightclip.training.reinforce import StoredAugmentation, load_teacher, reinforce

    work = Path(tempfile.mkdtemp(prefix="lightclip-reinforce-bench-"))
    width, height = (int(v) for v in args.photo_size.split("x"))
    photos = []
    for name in ("astronaut.jpg", "chelsea_cat.jpg"):
        buffer = io.BytesIO()
        Image.open(ROOT / "tests" / "fixtures" / name).convert("RGB").resize((width, height)).save(buffer, "JPEG",
                                                                                                   quality=90)
        photos.append(buffer.getvalue())
    words = ["a", "photo", "of", "an", "astronaut", "cat", "on", "the", "grass", "in", "space", "sleeping"]
    data = Dataset.from_dict({"image": [{"bytes": photos[i % 2], "path": None} for i in range(args.samples)],
                              "caption": [" ".join(words[(i + j) % len(words)] for j in range(6)) + f" {i}"
                                          for i in range(args.samples)]},
                             features=Features({"image": ImageFeature(decode=False), "caption": Value("string")}))
    image_bytes = sum(len(photos[i % 2]) for i in range(args.samples))
    by_teacher = {}
    for name in args.teachers:
        spec = _teacher_spec(name, work)
        teacher = load_teacher(spec, image_size=args.teacher_image_size)  # loaded once, outside the timing
        # one untimed batch first: the first calls of a model pay for memory allocation and kernel selection
        reinforce({"train": data.select(range(min(args.batch_size, args.samples)))}, work / f"{name}-warm-up", [],
                  batch_size=args.batch_size, teachers=[teacher])
        runs = {}
        for views in args.num_augmentations:
            out = work / f"{name}-R{views}"
            started = time.perf_counter()
            meta = reinforce({"train": data}, out, [], shard_size=max(args.samples // 4, 1),
                             batch_size=args.batch_size, teachers=[teacher],
                             augmentation=StoredAugmentation(num_augmentations=views))
            seconds = time.perf_counter() - started
            size = sum(p.stat().st_size for p in (out / "train").glob("*.parquet"))
            record = meta["teachers"][0]
            runs[views] = {"rows": meta["splits"]["train"]["rows"], "seconds": seconds,
                           "samples_per_s": args.samples / seconds, "copy_bytes_per_sample": size / args.samples,
                           "source_image_bytes_per_sample": image_bytes / args.samples,
                           "feature_bytes_per_sample": 2 * (record["image_dim"] * max(views, 1) + record["text_dim"])
                           + 4 * 5 * views}
            print(f"{name}, K={views}: {args.samples} samples in {seconds:.1f} s: "
                  f"{runs[views]['samples_per_s']:.1f} samples/s; copy "
                  f"{runs[views]['copy_bytes_per_sample'] / 1024:.1f} KiB per sample (images "
                  f"{image_bytes / args.samples / 1024:.1f} KiB, features "
                  f"{runs[views]['feature_bytes_per_sample'] / 1024:.1f} KiB)", flush=True)
            shutil.rmtree(out, ignore_errors=True)
        by_teacher[name] = runs
        del teacher
    first = by_teacher[args.teachers[0]]
    result = {"setting": vars(args) | {"threads": torch.get_num_threads(), "device": "cuda" if torch.cuda.is_available()
                                       else "cpu"}, **first[args.num_augmentations[0]], "by_num_augmentations": first,
              "by_teacher": by_teacher}
    if args.json:
        write_results(args.json, result)
    shutil.rmtree(work, ignore_errors=True)


def _teacher_spec(name: str, work: Path) -> str:
    """The `--teacher` spec of a measured teacher; the ViT-B-32 ones written into `work` from random weights."""
    if name == "frozen-pair":
        return name
    import json

    import open_clip
    from safetensors.torch import save_file

    folder = work / "open_clip-vit-b-32"
    if not folder.is_dir():
        config = open_clip.get_model_config("ViT-B-32")
        model = open_clip.CLIP(**config)
        folder.mkdir(parents=True)
        (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": config, "preprocess_cfg": {}}))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  str(folder / "open_clip_model.safetensors"))
    if name == "open_clip-vit-b-32":
        return f"open_clip:local-dir:{folder}"
    converted = work / "clip-vit-b-32"
    if not converted.is_dir():
        from modeling_lightclip.training.open_clip_convert import main as convert

        if convert([f"local-dir:{folder}", "--out", str(converted)]) != 0:
            raise SystemExit("converting the OpenCLIP ViT-B-32 to a CLIPModel folder failed")
    return str(converted)


if __name__ == "__main__":
    main()
