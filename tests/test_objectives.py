"""The training objectives against independent oracles: hand-computed targets, brute-force matching, a second
implementation of the soft-label loss, masking statistics, and inference parity."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import CAPTIONS, make_batch
from modeling_lightclip import LightCLIPModel
from modeling_lightclip.objectives_lightclip import (
    InstanceContrastiveLoss,
    TokenAlignmentLoss,
    mask_tokens,
    similarity_cross_entropy,
    soft_label_alpha,
    soft_targets,
    solve_word_patch_assignment,
)
from modeling_lightclip.training.recipes import build_model_config


# ---------------------------------------------------------------------------------------------- instance level


def test_soft_targets_by_hand():
    positives = torch.tensor([0, 2])
    # alpha = 0: one-hot, whatever the mode
    for mode in ("none", "uniform", "similarity"):
        assert torch.equal(soft_targets(torch.zeros(2, 3), positives, 3, 0.0, mode, 0.5),
                           torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    # uniform, alpha = 0.3 over 2 negatives
    uniform = soft_targets(None, positives, 3, 0.3, "uniform", 0.5)
    torch.testing.assert_close(uniform, torch.tensor([[0.7, 0.15, 0.15], [0.15, 0.15, 0.7]]))
    # similarity, alpha = 0.3, temperature 0.5: row 0 negatives have similarities 0.5 and 0.0
    sim = torch.tensor([[1.0, 0.5, 0.0], [0.2, -0.3, 1.0]])
    e = math.e
    row0 = [0.7, 0.3 * e / (e + 1), 0.3 * 1 / (e + 1)]            # softmax([0.5, 0.0] / 0.5) = softmax([1, 0])
    # row 1: negatives 0.2 and -0.3 -> logits 0.4 and -0.6 -> softmax = [e^0.4, e^-0.6] / sum
    z = math.exp(0.4) + math.exp(-0.6)
    row1 = [0.3 * math.exp(0.4) / z, 0.3 * math.exp(-0.6) / z, 0.7]
    torch.testing.assert_close(soft_targets(sim, positives, 3, 0.3, "similarity", 0.5), torch.tensor([row0, row1]))
    # every row is a distribution
    torch.testing.assert_close(soft_targets(sim, positives, 3, 0.3, "similarity", 0.5).sum(1), torch.ones(2))


@pytest.mark.parametrize("schedule, expected", [
    ("linear", [0.0, 0.05, 0.1, 0.15, 0.2]),
    ("cosine", [0.0, 0.2 * (1 - math.cos(math.pi / 4)) / 2, 0.1, 0.2 * (1 - math.cos(3 * math.pi / 4)) / 2, 0.2]),
    ("step", [0.0, 0.0, 0.2, 0.2, 0.2]),
    ("constant", [0.2] * 5),
])
def test_alpha_schedules(schedule, expected):
    got = [soft_label_alpha(p, 0.2, schedule) for p in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert got == pytest.approx(expected)


def _soft_clip_loss_reference(image, text, scale, alpha, mode, temperature, similar_image=None, similar_text=None):
    """A second implementation: explicit loops over rows, KL-style cross-entropy with soft targets."""
    n = image.shape[0]
    total = 0.0
    similar_image = image if similar_image is None else similar_image  # whose similarity spreads the mass
    similar_text = text if similar_text is None else similar_text
    for logits_fn, same in ((lambda i: scale * image[i] @ text.t(), similar_text),
                            (lambda i: scale * text[i] @ image.t(), similar_image)):
        for i in range(n):
            target = torch.zeros(n)
            target[i] = 1.0 - alpha
            negatives = [j for j in range(n) if j != i]
            if mode == "uniform":
                for j in negatives:
                    target[j] = alpha / (n - 1)
            else:
                sims = torch.stack([same[i] @ same[j] for j in negatives]) / temperature
                for j, w in zip(negatives, sims.softmax(0)):
                    target[j] = alpha * w
            total = total - (target * logits_fn(i).log_softmax(0)).sum() / n
    return total / 2


@pytest.mark.parametrize("mode", ["uniform", "similarity"])
def test_soft_label_loss_equals_second_implementation(mode):
    torch.manual_seed(0)
    image = F.normalize(torch.randn(5, 8), dim=-1)
    text = F.normalize(torch.randn(5, 8), dim=-1)
    loss = InstanceContrastiveLoss(mode, 0.2)(image, text, torch.tensor(7.0), alpha=0.25)["instance"]
    torch.testing.assert_close(loss, _soft_clip_loss_reference(image, text, 7.0, 0.25, mode, 0.2))


def test_frozen_feature_soft_labels_equal_second_implementation():
    """soft_label_source="frozen": the mass is spread by the frozen encoders' similarities (other dimensions than
    the student's), not by the student's own."""
    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(6, 8), dim=-1), F.normalize(torch.randn(6, 8), dim=-1)
    frozen_image, frozen_text = F.normalize(torch.randn(6, 20), dim=-1), F.normalize(torch.randn(6, 12), dim=-1)
    loss = InstanceContrastiveLoss("similarity", 0.2, source="frozen")(
        image, text, torch.tensor(7.0), alpha=0.3, teacher_image_features=frozen_image,
        teacher_text_features=frozen_text)["instance"]
    expected = _soft_clip_loss_reference(image, text, 7.0, 0.3, "similarity", 0.2, frozen_image, frozen_text)
    torch.testing.assert_close(loss, expected)
    student = InstanceContrastiveLoss("similarity", 0.2)(image, text, torch.tensor(7.0), alpha=0.3)["instance"]
    assert abs(student.item() - loss.item()) > 1e-4
    both = InstanceContrastiveLoss("similarity", 0.2, source="frozen", modality="both")(
        image, text, torch.tensor(7.0), alpha=0.3, teacher_image_features=frozen_image,
        teacher_text_features=frozen_text)["instance"]
    joint = torch.cat([frozen_image, frozen_text], dim=1) / 2 ** 0.5  # joint_i . joint_j = mean of the two similarities
    expected = _soft_clip_loss_reference(image, text, 7.0, 0.3, "similarity", 0.2, joint, joint)
    torch.testing.assert_close(both, expected)
    text_only = InstanceContrastiveLoss("similarity", 0.2, source="frozen", modality="text")(
        image, text, torch.tensor(7.0), alpha=0.3, teacher_image_features=frozen_image,
        teacher_text_features=frozen_text)["instance"]
    expected = _soft_clip_loss_reference(image, text, 7.0, 0.3, "similarity", 0.2, frozen_text, frozen_text)
    torch.testing.assert_close(text_only, expected)
    with pytest.raises(ValueError, match="teachers' features"):
        InstanceContrastiveLoss("similarity", 0.2, source="frozen")(image, text, torch.tensor(7.0), alpha=0.3)


def test_alpha_follows_training_progress(tiny_recipe, tokenizer):
    config = build_model_config(tiny_recipe["model"], tokenizer, soft_label_max=0.4, soft_label_schedule="linear")
    model = LightCLIPModel(config)
    model.set_training_progress(0.5)
    assert model.soft_label_alpha == pytest.approx(0.2)
    model.set_training_progress(3.0)  # clipped
    assert model.soft_label_alpha == pytest.approx(0.4)
    model.config.soft_label_mode = "none"
    assert model.soft_label_alpha == 0.0


# ---------------------------------------------------------------------------------------------- matching


def _brute_force_best(sim: torch.Tensor) -> float:
    """Maximum total similarity of a one-to-one partial assignment, by enumerating injective maps."""
    rows, cols = sim.shape
    best = -math.inf
    if rows <= cols:
        for perm in itertools.permutations(range(cols), rows):
            best = max(best, sum(sim[r, perm[r]].item() for r in range(rows)))
    else:
        for perm in itertools.permutations(range(rows), cols):
            best = max(best, sum(sim[perm[c], c].item() for c in range(cols)))
    return best


@pytest.mark.parametrize("solver", ["scipy", "batched"])
def test_assignment_equals_brute_force(solver):
    if solver == "batched":
        pytest.importorskip("torch_linear_assignment")
    generator = torch.Generator().manual_seed(0)
    for trial in range(30):
        batch, length, patches = 3, 5, int(torch.randint(3, 7, (1,), generator=generator))
        sim = torch.rand(batch, length, patches, generator=generator) * 2 - 1
        mask = torch.rand(batch, length, generator=generator) < 0.8
        mask[0] = True  # one caption longer than the patch count when patches < 5
        matches = solve_word_patch_assignment(sim, mask, solver)
        for b in range(batch):
            rows = mask[b].nonzero().flatten()
            matched = matches[b] >= 0
            assert not matched[~mask[b]].any(), "a padding/special token was matched"
            cols = matches[b][matched]
            assert len(set(cols.tolist())) == len(cols), "a patch was used twice"
            assert int(matched.sum()) == min(len(rows), patches)
            got = sum(sim[b, r, c].item() for r, c in zip(matched.nonzero().flatten().tolist(), cols.tolist()))
            expected = _brute_force_best(sim[b, rows]) if len(rows) else 0.0
            assert got == pytest.approx(expected, abs=1e-5), (trial, b)


def test_match_threshold_drops_poor_matches():
    torch.manual_seed(0)
    loss = TokenAlignmentLoss(4, 4, 4, match_threshold=0.99, negatives="image", solver="scipy")
    out = loss(torch.randn(2, 6, 4), torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), return_matches=True)
    # random projections: nothing reaches cosine 0.99, so everything is dropped and the loss is a graph-carrying zero
    assert (out["matches"] == -1).all()
    assert out["token"].item() == 0.0 and out["token"].requires_grad


@pytest.mark.parametrize("negatives", ["image", "batch"])
def test_token_objective_learns_a_toy_alignment_without_collapse(negatives):
    """Words are noisy views of hidden patches (through a different linear map); training the token projections
    must recover which patch each word came from, and the token embeddings must keep their spread."""
    torch.manual_seed(0)
    batch, num_patches, num_words, dim = 8, 9, 4, 12
    mix = torch.randn(dim, dim)
    loss_fn = TokenAlignmentLoss(dim, dim, 16, temperature=0.1, negatives=negatives, solver="scipy")
    optimiser = torch.optim.Adam(loss_fn.parameters(), lr=0.02)

    def sample():
        patches = torch.randn(batch, num_patches, dim)
        source = torch.stack([torch.randperm(num_patches)[:num_words] for _ in range(batch)])
        words = patches.gather(1, source.unsqueeze(-1).expand(-1, -1, dim)) @ mix + 0.1 * torch.randn(batch, num_words, dim)
        return patches, words, source

    mask = torch.ones(batch, num_words, dtype=torch.bool)
    history = []
    for _ in range(300):
        patches, words, _ = sample()
        loss = loss_fn(patches, words, mask)["token"]
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(loss.item())
    patches, words, source = sample()
    with torch.no_grad():
        out = loss_fn(patches, words, mask, return_matches=True)
        embedded = F.normalize(loss_fn.text_token_projection(words), dim=-1).flatten(0, 1)
    assert sum(history[-10:]) / 10 < 0.5 * sum(history[:10]) / 10
    accuracy = (out["matches"] == source).float().mean().item()
    assert accuracy > 0.9, accuracy
    # no collapse: token embeddings still point in many directions (mean pairwise cosine well below 1)
    cosine = embedded @ embedded.t()
    off_diagonal = cosine[~torch.eye(len(cosine), dtype=torch.bool)]
    assert off_diagonal.mean().item() < 0.5
    assert embedded.var(dim=0).sum().item() > 0.5


@pytest.mark.parametrize("columns", [1, 5, None])
@pytest.mark.parametrize("masked", [False, True])
def test_chunked_similarity_cross_entropy_equals_the_materialised_logits(columns, masked):
    """The summed cross-entropy computed a few key columns at a time equals `F.cross_entropy` of the whole logit
    matrix (masked keys at -inf), value and gradients for queries and keys, in float64."""
    generator = torch.Generator().manual_seed(4)
    queries = F.normalize(torch.randn(7, 6, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    keys = F.normalize(torch.randn(23, 6, generator=generator, dtype=torch.float64), dim=-1).requires_grad_()
    targets = torch.tensor([0, 4, 4, 9, 22, 13, 17])
    key_mask = (torch.rand(23, generator=generator) > 0.3) if masked else None
    if key_mask is not None:
        key_mask[targets] = True
    logits = queries @ keys.t() / 0.07
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask, float("-inf"))
    expected = F.cross_entropy(logits, targets, reduction="sum")
    expected_grads = torch.autograd.grad(expected * 1.7, (queries, keys))
    got = similarity_cross_entropy(queries, keys, targets, 0.07, key_mask=key_mask, columns=columns)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-6)
    for grad, want in zip(torch.autograd.grad(got * 1.7, (queries, keys)), expected_grads):
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6)


def test_token_alignment_with_batch_negatives_equals_a_loop_over_matched_words():
    """Batch negatives: each matched word's cross-entropy over every patch of the batch, and each matched patch's
    over every real word of the batch, summed in a Python loop and normalised by the matched count."""
    torch.manual_seed(2)
    loss_fn = TokenAlignmentLoss(5, 4, 6, temperature=0.2, negatives="batch", solver="scipy")
    image_tokens, text_tokens = torch.randn(3, 7, 5), torch.randn(3, 4, 4)
    word_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    out = loss_fn(image_tokens, text_tokens, word_mask, return_matches=True)
    patches = F.normalize(loss_fn.image_token_projection(image_tokens), dim=-1)
    words = F.normalize(loss_fn.text_token_projection(text_tokens), dim=-1)
    terms = []
    for b, l in (out["matches"] >= 0).nonzero().tolist():
        p = int(out["matches"][b, l])
        word_scores = torch.stack([words[b, l] @ patches[i, j] for i in range(3) for j in range(7)]) / 0.2
        terms.append(torch.logsumexp(word_scores, 0) - word_scores[b * 7 + p])
        real = [(i, j) for i in range(3) for j in range(4) if word_mask[i, j]]
        patch_scores = torch.stack([patches[b, p] @ words[i, j] for i, j in real]) / 0.2
        terms.append(torch.logsumexp(patch_scores, 0) - patch_scores[real.index((b, l))])
    expected = 0.5 * torch.stack(terms).sum() / (out["matches"] >= 0).sum()
    torch.testing.assert_close(out["token"], expected, rtol=1e-5, atol=1e-6)
    grads = torch.autograd.grad(out["token"], list(loss_fn.parameters()), retain_graph=True)
    for grad, want in zip(grads, torch.autograd.grad(expected, list(loss_fn.parameters()))):
        torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------- MLM


def test_masking_statistics():
    generator = torch.Generator().manual_seed(0)
    vocab, mask_id, specials = 1000, 4, [0, 2, 3]
    ids = torch.randint(5, vocab, (400, 64), generator=generator)
    ids[:, 0], ids[:, -1] = 2, 3                      # [CLS] ... [SEP]
    attention = torch.ones_like(ids)
    attention[:, 48:] = 0
    ids[:, 48:] = 0                                   # padding
    masked, labels = mask_tokens(ids, attention, mask_id, specials, vocab, 0.15, generator)
    eligible = attention.bool() & ~torch.isin(ids, torch.tensor(specials))
    selected = labels != -100
    assert not selected[~eligible].any(), "special or padding token selected"
    assert torch.equal(labels[selected], ids[selected])
    rate = selected.sum().item() / eligible.sum().item()
    assert rate == pytest.approx(0.15, abs=0.01)
    n = selected.sum().item()
    to_mask = (masked[selected] == mask_id).sum().item() / n
    kept = (masked[selected] == ids[selected]).sum().item() / n
    replaced = 1 - to_mask - kept
    assert to_mask == pytest.approx(0.8, abs=0.02)
    assert kept == pytest.approx(0.1 + 0.1 / vocab, abs=0.02)
    assert replaced == pytest.approx(0.1, abs=0.02)
    assert torch.equal(masked[~selected], ids[~selected])


def test_forward_masks_by_itself_when_the_collator_did_not(tiny_recipe, tokenizer):
    config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, mlm_probability=0.5)
    model = LightCLIPModel(config).eval()  # no dropout: the masking is the only random draw
    batch = make_batch(tokenizer, batch_size=4)
    torch.manual_seed(0)
    auto = model(**batch, return_loss=True).losses["mlm"]
    torch.manual_seed(0)
    mlm_input_ids, mlm_labels = model.mask_for_mlm(batch["input_ids"], batch["attention_mask"])
    given = model(**batch, return_loss=True, mlm_input_ids=mlm_input_ids, mlm_labels=mlm_labels).losses["mlm"]
    assert torch.isfinite(auto) and auto.item() > 0
    assert given.item() == pytest.approx(auto.item(), rel=1e-6)


def test_collator_masks_by_the_configs_rule(tiny_recipe, tokenizer, photo_paths):
    """One masking rule: the collator masks with the model config's special ids (here a word the config declares
    its BOS token, which the tokenizer does not know as special) and the text tower's vocabulary."""
    from modeling_lightclip.training.data import ImageTextCollator
    from modeling_lightclip.training.preprocessing import build_processor

    word = tokenizer.convert_tokens_to_ids("photo")
    config = build_model_config(tiny_recipe["model"], tokenizer, mlm_probability=0.9)
    config.text_config.bos_token_id = word
    assert word in config.special_token_ids()
    collator = ImageTextCollator(build_processor(32, tokenizer), model_config=config)
    examples = [{"image": str(photo_paths[i % 2]), "caption": "a photo of a photo of a cat " * 2} for i in range(16)]
    batch = collator(examples)
    selected = batch["training_targets"]["mlm_labels"] != -100
    assert selected.any()
    assert not torch.isin(batch["input_ids"][selected], torch.tensor(config.special_token_ids())).any()
    assert (batch["input_ids"] == word).any() and int(batch["training_targets"]["mlm_input_ids"].max()) < config.text_config.vocab_size
    no_mlm = build_model_config(tiny_recipe["model"], tokenizer, mlm_loss_weight=0.0)
    assert "mlm_input_ids" not in ImageTextCollator(build_processor(32, tokenizer), model_config=no_mlm)(examples)


def test_loss_is_the_weighted_sum_of_the_named_terms(tiny_recipe, tokenizer):
    """`LightCLIPObjectives.forward` sums the terms with the config's weights (instance weight 1)."""
    config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.3, mlm_loss_weight=0.7,
                                soft_label_mode="none")
    torch.manual_seed(0)
    model = LightCLIPModel(config).train()
    batch = make_batch(tokenizer, batch_size=4)
    out = model(**batch, return_loss=True)
    assert set(out.losses) == {"instance", "token", "mlm"}
    expected = out.losses["instance"] + 0.3 * out.losses["token"] + 0.7 * out.losses["mlm"]
    torch.testing.assert_close(out.loss, expected)
    clip = LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0,
                                             mlm_loss_weight=0.0, soft_label_mode="none")).train()
    out = clip(**batch, return_loss=True)
    assert set(out.losses) == {"instance"} and torch.equal(out.loss, out.losses["instance"])


def test_mlm_switches_untied_head_no_fusion_delayed_start(tiny_recipe, tokenizer):
    """mlm_tie_head=False decodes with a matrix of its own (word-embedding rows of tokens absent from the caption
    stop mattering); mlm_fusion=False makes MLM blind to the image; mlm_start delays the term."""
    batch = make_batch(tokenizer, batch_size=4)

    def mlm_loss(model, batch, ids, labels):
        return model(**batch, return_loss=True, mlm_input_ids=ids, mlm_labels=labels).losses["mlm"].item()

    for tie, changes in ((True, True), (False, False)):
        config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, mlm_batch_fraction=1.0,
                                    mlm_probability=0.5, mlm_tie_head=tie)
        torch.manual_seed(0)
        model = LightCLIPModel(config).eval()
        assert (model.objectives.mlm.head_decoder is None) == tie
        ids, labels = model.mask_for_mlm(batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(0))
        absent = sorted(set(range(len(tokenizer))) - set(ids.flatten().tolist()))[5:40]  # never fed in
        before = mlm_loss(model, batch, ids, labels)
        with torch.no_grad():
            model.text_model.get_input_embeddings().weight[absent] *= 3.0
        assert (abs(mlm_loss(model, batch, ids, labels) - before) > 1e-5) == changes, tie

    config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, mlm_batch_fraction=1.0,
                                mlm_fusion=False, mlm_probability=0.5)
    model = LightCLIPModel(config).eval()
    assert len(model.objectives.mlm.fusion) == 0
    ids, labels = model.mask_for_mlm(batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(0))
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    assert mlm_loss(model, batch, ids, labels) == pytest.approx(mlm_loss(model, other, ids, labels), rel=1e-6)

    config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, soft_label_mode="none",
                                mlm_start=0.5, mlm_probability=0.5)
    model = LightCLIPModel(config).train()
    model.set_training_progress(0.2)
    early = model(**batch, return_loss=True)
    assert early.losses["mlm"].item() == 0.0 and torch.equal(early.loss, early.losses["instance"])
    early.loss.backward()  # every MLM parameter still gets a (zero) gradient: DDP needs them all
    assert all(p.grad is not None for p in model.objectives.mlm.parameters())
    model.set_training_progress(0.6)
    assert model(**batch, return_loss=True).losses["mlm"].item() > 0


def test_mlm_head_is_tied_to_word_embeddings(tiny_model):
    names = [n for n, _ in tiny_model.objectives.mlm.named_parameters()]
    assert not any("decoder" in n or n.endswith("embeddings.weight") for n in names)


def test_fusion_reaches_the_text_layers_and_image(tiny_recipe, tokenizer):
    """MLM gradients reach the fusion blocks, the image tower (through the fused features) and the text tower."""
    config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, soft_label_mode="none",
                                mlm_probability=0.5)
    model = LightCLIPModel(config).train()
    with torch.no_grad():  # open the zero-initialised gates so cross-attention contributes
        for block in model.objectives.mlm.fusion:
            block.attention_gate.fill_(1.0)
    batch = make_batch(tokenizer, batch_size=4)
    torch.manual_seed(0)
    ids, labels = model.mask_for_mlm(batch["input_ids"], batch["attention_mask"])
    out = model(**batch, return_loss=True, mlm_input_ids=ids, mlm_labels=labels)
    out.losses["mlm"].backward()
    for block in model.objectives.mlm.fusion:
        assert block.cross_attention.in_proj_weight.grad.abs().sum() > 0
    first_stage = next(p for n, p in model.vision_model.named_parameters() if "embedder" in n)
    assert first_stage.grad is not None and first_stage.grad.abs().sum() > 0
    # the text changes with the image: same caption, other images -> other MLM loss
    with torch.no_grad():
        other = model(**{**batch, "pixel_values": batch["pixel_values"].flip(0)}, return_loss=True,
                      mlm_input_ids=ids, mlm_labels=labels).losses["mlm"]
    model.eval()
    assert other.item() != pytest.approx(out.losses["mlm"].item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------- parity


def test_inference_parity_with_and_without_training_modules(tiny_recipe, tokenizer, tmp_path):
    full = LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer)).eval()
    plain = LightCLIPModel(build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0,
                                              mlm_loss_weight=0.0)).eval()
    assert sum(p.numel() for p in full.objectives.parameters()) > 0
    assert sum(p.numel() for p in plain.objectives.parameters()) == 0
    missing, unexpected = plain.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith("objectives.") for k in unexpected)
    batch = make_batch(tokenizer, batch_size=3)
    calls = []
    for module in full.objectives.modules():
        module.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        a, b = full(**batch), plain(**batch)
    assert not calls, "a training-only module ran on the inference path"
    assert torch.equal(a.image_embeds, b.image_embeds) and torch.equal(a.text_embeds, b.text_embeds)
    inference_params = sum(p.numel() for n, p in full.named_parameters() if not n.startswith("objectives."))
    assert inference_params == sum(p.numel() for p in plain.parameters())

    # an inference-only checkpoint: no training modules in the weights, objectives off in its config
    full.config.save_training_modules = False
    full.save_pretrained(tmp_path)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("objectives.")]
    loaded = LightCLIPModel.from_pretrained(tmp_path).eval()
    assert loaded.config.token_loss_weight == 0 and loaded.config.mlm_loss_weight == 0
    assert full.config.token_loss_weight > 0  # the live model keeps its training config
    with torch.no_grad():
        assert torch.equal(loaded(**batch).image_embeds, a.image_embeds)


# ---------------------------------------------------------------------------------------------- robustness


def _check_step(model, batch):
    model.zero_grad()
    out = model(**batch, return_loss=True)
    assert torch.isfinite(out.loss), out.losses
    for term in out.losses.values():
        assert torch.isfinite(term)
    out.loss.backward()
    for name, param in model.named_parameters():
        if param.grad is not None:
            assert torch.isfinite(param.grad).all(), name
    return out


def test_robust_to_degenerate_batches(tiny_recipe, tokenizer):
    config = build_model_config(tiny_recipe["model"], tokenizer, soft_label_max=0.5, soft_label_schedule="constant")
    model = LightCLIPModel(config).train()
    batch = make_batch(tokenizer, batch_size=4)
    # batch of one
    _check_step(model, {k: v[:1] for k, v in batch.items()})
    # a caption with no word token ([CLS] [SEP]) and an all-padding row
    degenerate = {k: v.clone() for k, v in batch.items()}
    degenerate["input_ids"][1, 1] = tokenizer.sep_token_id
    degenerate["input_ids"][1, 2:] = tokenizer.pad_token_id
    degenerate["attention_mask"][1, 2:] = 0
    degenerate["input_ids"][2] = tokenizer.pad_token_id
    degenerate["attention_mask"][2] = 0
    _check_step(model, degenerate)
    # no word token anywhere: the token term is an exact, graph-carrying zero
    empty = {k: v.clone() for k, v in batch.items()}
    empty["input_ids"][:, 1] = tokenizer.sep_token_id
    empty["input_ids"][:, 2:] = tokenizer.pad_token_id
    empty["attention_mask"][:, 2:] = 0
    out = _check_step(model, empty)
    assert out.losses["token"].item() == 0.0
    # captions longer than the patch count (tiny: 2x2 = 4 patches at stage -2)
    assert model.vision_shapes.stage_num_tokens[-2] < (batch["attention_mask"].sum(1) - 2).max()
    _check_step(model, batch)


def _fused_mlm_model(tiny_recipe, tokenizer, gate: float, **overrides):
    """A tiny MLM model without dropout, fusion gates opened to `gate`, a batch and its masked copy (seeded)."""
    text = {**tiny_recipe["model"]["text_config"], "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, text_config=text, **overrides)
    torch.manual_seed(0)
    model = LightCLIPModel(config)
    with torch.no_grad():
        for block in model.objectives.mlm.fusion:
            block.attention_gate.fill_(gate)
    batch = make_batch(tokenizer, batch_size=4)
    ids, labels = model.mask_for_mlm(batch["input_ids"], batch["attention_mask"], torch.Generator().manual_seed(0))
    return model, batch, ids, labels


def test_gradient_checkpointing_keeps_the_fused_mlm_gradients(tiny_recipe, tokenizer):
    """The fusion hooks sit on checkpointed text layers: recomputation must reproduce them exactly."""
    model, batch, ids, labels = _fused_mlm_model(tiny_recipe, tokenizer, 0.7, mlm_batch_fraction=1.0)
    model.train()

    def gradients():
        model.zero_grad()
        out = model(**batch, return_loss=True, mlm_input_ids=ids, mlm_labels=labels)
        out.losses["mlm"].backward()
        return out.losses["mlm"].item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, plain = gradients()
    model.gradient_checkpointing_enable()
    assert any(getattr(m, "gradient_checkpointing", False) for m in model.text_model.modules())
    loss_ckpt, checkpointed = gradients()
    assert loss_ckpt == pytest.approx(loss)
    assert set(plain) == set(checkpointed)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


def test_weight_decay_groups_and_callback(tiny_model):
    from types import SimpleNamespace

    from modeling_lightclip.training.optimizer_groups import decay_parameter_names
    from modeling_lightclip.training.trainer import LightCLIPCallback

    decayed = set(decay_parameter_names(tiny_model))
    names = dict(tiny_model.named_parameters())
    assert "logit_scale" not in decayed
    assert not [n for n in decayed if n.endswith(".bias")]
    norms = [n for n, m in tiny_model.named_modules()
             if isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm2d)) and m.weight is not None]
    assert norms and not [n for n in norms if f"{n}.weight" in decayed]
    assert not [n for n in decayed if "gate" in n]
    assert "visual_projection.weight" in decayed and "text_projection.weight" in decayed
    convs = [f"{n}.weight" for n, m in tiny_model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and set(convs) <= decayed
    assert decayed == {n for n, p in names.items() if p.ndim >= 2}

    callback = LightCLIPCallback()
    state = SimpleNamespace(global_step=30, max_steps=120)
    callback.on_step_begin(None, state, None, model=tiny_model)
    assert tiny_model.training_progress == pytest.approx(0.25)
    with torch.no_grad():
        tiny_model.logit_scale.fill_(9.0)
    callback.on_step_end(None, state, None, model=tiny_model)
    assert tiny_model.logit_scale.item() == pytest.approx(math.log(100.0))


# ---------------------------------------------------------------------------------------------- fine-grained score


@pytest.mark.parametrize("num_words,num_patches", [(4, 7), (6, 3)])
def test_sinkhorn_relaxation_approaches_the_hungarian_optimum(num_words, num_patches):
    """The entropic plan respects the partial-matching marginals and, at a small epsilon, reaches the exact
    assignment's total similarity (the LP of bipartite matching is integral)."""
    from scipy.optimize import linear_sum_assignment

    from modeling_lightclip.objectives_lightclip import sinkhorn_partial_matching

    torch.manual_seed(0)
    similarity = torch.rand(3, num_words, num_patches, dtype=torch.float64) * 2 - 1
    mask = torch.ones(3, num_words, dtype=torch.bool)
    mask[1, -1] = False  # a padding token sends nothing
    plan = sinkhorn_partial_matching(similarity, mask, epsilon=0.003, iterations=3000)
    for b in range(3):
        rows = mask[b].nonzero().flatten().numpy()
        r, c = linear_sum_assignment(similarity[b, rows].numpy(), maximize=True)
        optimum = similarity[b, rows][r, c].sum().item()
        assert (plan[b] * similarity[b]).sum().item() == pytest.approx(optimum, abs=0.02)
        assert (plan[b].sum(-1) <= 1 + 1e-3).all() and (plan[b].sum(-2) <= 1 + 1e-3).all()
        assert plan[b].sum().item() == pytest.approx(min(len(rows), num_patches), abs=1e-3)
        assert plan[b, ~mask[b]].abs().sum() < 1e-9


def test_fine_grained_scores_equal_brute_force():
    """FILIP-style score with Hungarian matching: for every (caption, image) pair, the mean similarity of the
    caption's real words to their assigned patches, from a brute force over assignments."""
    from modeling_lightclip.objectives_lightclip import fine_grained_scores

    torch.manual_seed(1)
    words = F.normalize(torch.randn(3, 3, 6), dim=-1)
    patches = F.normalize(torch.randn(2, 4, 6), dim=-1)
    mask = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    scores = fine_grained_scores(words, mask, patches, "hungarian", solver="scipy")
    for a in range(3):
        real = mask[a].nonzero().flatten().tolist()
        for b in range(2):
            sim = words[a] @ patches[b].t()
            best = max(sum(sim[w, p] for w, p in zip(real, perm)) for perm in itertools.permutations(range(4), len(real)))
            assert scores[a, b].item() == pytest.approx(best.item() / len(real), abs=1e-5)
    relaxed = fine_grained_scores(words, mask, patches, "sinkhorn", epsilon=0.05)
    assert relaxed.shape == scores.shape and (relaxed <= scores + 1e-4).all()  # a relaxation cannot beat the optimum


@pytest.mark.parametrize("matching", ["hungarian", "sinkhorn"])
def test_filip_token_objective_trains(tiny_recipe, tokenizer, matching):
    """The fine-grained objective is a contrast over image-caption pairs: its loss equals InfoNCE over the pair
    scores, it reaches the token projections, and it is refused with Sinkhorn unless FILIP is on."""
    from modeling_lightclip.objectives_lightclip import fine_grained_scores

    config = build_model_config(tiny_recipe["model"], tokenizer, token_objective="filip", token_matching=matching,
                                mlm_loss_weight=0.0, soft_label_mode="none")
    torch.manual_seed(0)
    model = LightCLIPModel(config).train()
    batch = make_batch(tokenizer, batch_size=4)
    out = model(**batch, return_loss=True, output_tokens=True)
    token = model.objectives.token
    patches = F.normalize(token.image_token_projection(model._token_alignment_tokens(
        model._encode_image(batch["pixel_values"], output_stages=True))), dim=-1)
    words = F.normalize(token.text_token_projection(out.text_tokens), dim=-1)
    scores = fine_grained_scores(words, out.text_word_mask, patches, matching, "scipy", token.sinkhorn_epsilon)
    target = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(scores.t() / token.temperature, target)
                      + F.cross_entropy(scores / token.temperature, target))
    torch.testing.assert_close(out.losses["token"], expected, rtol=1e-4, atol=1e-5)
    out.loss.backward()
    assert token.image_token_projection.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sinkhorn"):
        build_model_config(tiny_recipe["model"], tokenizer, token_matching="sinkhorn")


def test_frozen_relation_loss_equals_second_implementation():
    """KL(teacher || student) of each sample's softmax over the *other* samples, per modality, averaged."""
    from modeling_lightclip.objectives_lightclip import FrozenRelationLoss

    torch.manual_seed(0)
    image, text = F.normalize(torch.randn(5, 8), dim=-1), F.normalize(torch.randn(5, 8), dim=-1)
    frozen_image, frozen_text = F.normalize(torch.randn(5, 20), dim=-1), F.normalize(torch.randn(5, 12), dim=-1)
    loss = FrozenRelationLoss(0.2)(image, text, frozen_image, frozen_text)["relation"]

    def kl(student, teacher):
        total = 0.0
        for i in range(5):
            others = [j for j in range(5) if j != i]
            s = torch.stack([student[i] @ student[j] for j in others]) / 0.2
            t = torch.stack([teacher[i] @ teacher[j] for j in others]) / 0.2
            p, q = t.softmax(0), s.log_softmax(0)
            total = total + sum(p[k] * (p[k].log() - q[k]) for k in range(4))
        return total / 5

    torch.testing.assert_close(loss, 0.5 * (kl(image, frozen_image) + kl(text, frozen_text)))
    # the student that already has the teacher's geometry has (close to) zero loss
    same = FrozenRelationLoss(0.2)(frozen_image, frozen_text, frozen_image, frozen_text)["relation"]
    assert same.abs() < 1e-6 < loss


def test_one_text_call_for_captions_and_masked_copies_equals_two_passes(tiny_recipe, tokenizer):
    """The masked copies ride in the plain captions' text-tower call (#13). Oracle: a separate masked pass with the
    test's own hooks applying each fusion block after its layer, the MLM head written out, and the plain
    captions' embeddings from the inference path."""
    from modeling_lightclip.objectives_lightclip import find_text_layers

    model, batch, ids, labels = _fused_mlm_model(tiny_recipe, tokenizer, 0.8, soft_label_mode="none",
                                                 mlm_batch_fraction=0.5, mlm_probability=0.5)
    config = model.config
    model.eval()
    rows = torch.tensor([0, 2])  # half of the 4 rows, evenly spaced from the first (`mlm_row_indices`' rule)
    out = model(**batch, return_loss=True, mlm_input_ids=ids, mlm_labels=labels)

    with torch.no_grad():
        plain = model.get_text_features(batch["input_ids"], batch["attention_mask"]).pooler_output
        torch.testing.assert_close(out.text_embeds, F.normalize(plain, dim=-1))
        image_stages = model.vision_model(pixel_values=batch["pixel_values"][rows], output_hidden_states=True).hidden_states
        image_stages = [stage.flatten(2).transpose(1, 2) for stage in image_stages]  # (B, C, H, W) -> (B, HW, C)
        mlm = model.objectives.mlm
        layers = find_text_layers(model.text_model, config.text_config.num_hidden_layers)
        handles = []
        for block, layer, stage in zip(mlm.fusion, mlm.text_layers, mlm.vision_stages):
            def hook(module, args, output, block=block, stage=stage):
                if isinstance(output, tuple):
                    return (block(output[0], image_stages[stage]),) + tuple(output[1:])
                return block(output, image_stages[stage])
            handles.append(layers[layer].register_forward_hook(hook, prepend=True))
        mlm._hooked_layers_id = id(layers)  # keep the model's own hooks out of the oracle's pass
        try:
            states = model.text_model(input_ids=ids[rows], attention_mask=batch["attention_mask"][rows]).last_hidden_state
        finally:
            for handle in handles:
                handle.remove()
        asked = labels[rows] != -100
        logits = F.linear(mlm.head_transform(states[asked]), model.text_model.get_input_embeddings().weight,
                          mlm.head_bias)
        expected = F.cross_entropy(logits, labels[rows][asked])
    assert asked.sum() > 0
    torch.testing.assert_close(out.losses["mlm"], expected, rtol=1e-5, atol=1e-6)


def test_default_mlm_asks_as_many_predictions_as_half_the_rows_at_15_percent_from_half_the_masked_rows(tiny_recipe,
                                                                                                      tokenizer):
    """The default MLM (issue #13): masked copies of a quarter of the rows at 30%. Oracle: the studies' setting
    (half the rows at 15%) run through the same code - the text tower gets half as many extra rows, and the steps
    ask for the same number of predictions on average."""

    # one caption on every row: which rows get a masked copy (evenly spaced) must not change how many words they have
    captions = [max(CAPTIONS, key=len)] * 32
    batch = make_batch(tokenizer, batch_size=32, captions=captions)
    models = {}
    for name, fields in (("default", {}), ("studies", {"mlm_batch_fraction": 0.5, "mlm_probability": 0.15})):
        config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, mlm_loss_weight=0.5,
                                    **fields)
        torch.manual_seed(0)
        models[name] = LightCLIPModel(config).train()
    text_rows, predictions = {}, {}
    for name, model in models.items():
        seen = []
        handle = model.text_model.register_forward_pre_hook(lambda m, a, k: seen.append(k["input_ids"].shape[0]),
                                                            with_kwargs=True)
        try:
            model(**batch, return_loss=True)
        finally:
            handle.remove()
        text_rows[name] = seen
        torch.manual_seed(1)
        asked = [int((model.objectives.mlm_inputs(batch["input_ids"], batch["attention_mask"], {}, None, None,
                                                  1.0)[2] != -100).sum()) for _ in range(400)]
        predictions[name] = sum(asked) / len(asked)
    assert text_rows == {"default": [32 + 8], "studies": [32 + 16]}  # one text-tower call each
    assert predictions["default"] == pytest.approx(predictions["studies"], rel=0.1)
    assert predictions["default"] > 5  # real words were masked, not an empty comparison


def test_the_temperature_floor_keeps_every_loss_finite():
    """At the floors the config allows, the losses of extreme (perfectly aligned or opposed) embeddings are finite in
    float32 and bfloat16."""
    from modeling_lightclip.configuration_lightclip import MAX_LOG_LOGIT_SCALE, MIN_TEMPERATURE
    from modeling_lightclip.objectives_lightclip import FrozenRelationLoss, InstanceContrastiveLoss

    embeds = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]), dim=-1)
    for dtype in (torch.float32, torch.bfloat16):
        scale = torch.tensor(math.exp(MAX_LOG_LOGIT_SCALE), dtype=dtype)
        loss = InstanceContrastiveLoss("similarity", MIN_TEMPERATURE, "student")(
            embeds.to(dtype), embeds.flip(0).to(dtype), scale, alpha=0.3)["instance"]
        assert torch.isfinite(loss)
    relation = FrozenRelationLoss(MIN_TEMPERATURE)(embeds, embeds.flip(0), embeds, embeds)["relation"]
    assert torch.isfinite(relation)
