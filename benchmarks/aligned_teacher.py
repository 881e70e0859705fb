"""A multimodal teacher trained here: the frozen pair aligned into one space on the training pairs.

    python benchmarks/aligned_teacher.py --source outputs/ablation/data/reinforced_64 --out outputs/ablation/data/reinforced_64_aligned

The frozen pair (EfficientNet-Lite0 + all-MiniLM-L6-v2) knows which images and which captions are alike, but its two
spaces are unrelated. Two linear maps (1280 -> D, 384 -> D) and a temperature are fitted on the reinforced copy's
stored features of the *training* pairs with the symmetric CLIP loss (the encoders stay frozen, so this costs
seconds), and the aligned embeddings are added to every row as a second, multimodal teacher: a copy of the source
copy with columns `teacher1_image` / `teacher1_text` and the teacher described in `reinforced.json`. Cross-modal
distillation (`--distill_loss_weight`) then has image-text similarities to distil.
"""

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def fit_alignment(image: np.ndarray, text: np.ndarray, dim: int = 256, steps: int = 600, batch_size: int = 1024,
                  learning_rate: float = 1e-3, seed: int = 0):
    """Linear maps of the frozen image and text features into one `dim`-d space and a logit scale, fitted with the
    symmetric InfoNCE loss on the training pairs. Returns (image map, text map, logit scale, final loss)."""
    import torch
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    image_t, text_t = torch.from_numpy(image).float(), torch.from_numpy(text).float()
    image_map = torch.nn.Linear(image_t.shape[1], dim, bias=False)
    text_map = torch.nn.Linear(text_t.shape[1], dim, bias=False)
    log_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    optimiser = torch.optim.AdamW([*image_map.parameters(), *text_map.parameters(), log_scale], lr=learning_rate,
                                  weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        rows = torch.randint(0, image_t.shape[0], (min(batch_size, image_t.shape[0]),), generator=generator)
        a = F.normalize(image_map(image_t[rows]), dim=-1)
        b = F.normalize(text_map(text_t[rows]), dim=-1)
        logits = log_scale.clamp(max=math.log(100.0)).exp() * a @ b.t()
        target = torch.arange(len(rows))
        loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return image_map, text_map, float(log_scale.detach().clamp(max=math.log(100.0)).exp()), float(loss.detach())


def _features(table, column: str) -> np.ndarray:
    """A stored feature column as float32: (rows, d), or (rows, views, d) in a copy with stored views."""
    return np.asarray(table.column(column).to_pylist(), np.float32)


def write_aligned_copy(source: Path, out: Path, dim: int = 256, steps: int = 600, seed: int = 0) -> dict:
    """`source`'s reinforced copy plus the aligned pair as teacher 1, written to `out` (shard by shard, so every row
    keeps its own features; in a copy with stored views, one aligned image vector per view)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch
    import torch.nn.functional as F

    from modeling_lightclip.training.provenance import stamp
    from modeling_lightclip.training.reinforced_copy import META_FILE, read_meta, split_files, teacher_columns

    meta = read_meta(source)
    first = teacher_columns(0)
    tables = [pq.read_table(path) for path in split_files(source, "train")]
    image = np.concatenate([_features(t, first["image"]) for t in tables])
    text = np.concatenate([_features(t, first["text"]) for t in tables])
    views = image.shape[1] if image.ndim == 3 else 0  # a copy with stored views: (rows, views, d)
    started = time.perf_counter()
    # with stored views, every view is paired with its image's caption (the alignment sees what training distils)
    image_map, text_map, scale, loss = fit_alignment(image.reshape(-1, image.shape[-1]),
                                                     np.repeat(text, views, axis=0) if views else text, dim, steps,
                                                     seed=seed)
    fitted = time.perf_counter() - started
    second = teacher_columns(1)
    (out / "train").mkdir(parents=True, exist_ok=True)
    for path, table in zip(split_files(source, "train"), tables):
        with torch.no_grad():
            a = F.normalize(image_map(torch.from_numpy(_features(table, first["image"]))), dim=-1)
            b = F.normalize(text_map(torch.from_numpy(_features(table, first["text"]))), dim=-1)
        kind = pa.list_(pa.float16(), dim)
        image_kind = pa.list_(kind, views) if views else kind  # one aligned vector per stored view
        table = table.append_column(second["image"], pa.array(a.half().numpy().tolist(), type=image_kind))
        table = table.append_column(second["text"], pa.array(b.half().numpy().tolist(), type=kind))
        name = Path(path).name
        pq.write_table(table, out / "train" / (name + ".tmp"))
        os.replace(out / "train" / (name + ".tmp"), out / "train" / name)
        shutil.copyfile(Path(path).with_suffix(".json"), (out / "train" / name).with_suffix(".json"))
    if (source / "validation").is_dir():
        shutil.copytree(source / "validation", out / "validation", dirs_exist_ok=True)
    meta["teachers"].append({"name": "frozen pair aligned on the training pairs", "kind": "multimodal",
                             "model_type": "linear maps on the frozen pair", "image_dim": dim, "text_dim": dim,
                             "logit_scale": scale, "columns": second,
                             "preprocessing": f"teacher 0's features through two linear maps fitted with the CLIP loss "
                                              f"({steps} steps, batch 1024, final loss {loss:.3f}, {fitted:.1f} s)"})
    meta["provenance"] = stamp()
    (out / META_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="a reinforced copy with the frozen-pair teacher as teacher 0")
    parser.add_argument("--out", required=True)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--steps", type=int, default=600)
    args = parser.parse_args(argv)
    meta = write_aligned_copy(Path(args.source), Path(args.out), args.dim, args.steps)
    print(json.dumps(meta["teachers"][-1], indent=2))


if __name__ == "__main__":
    main()
