"""CONTRIBUTING.md's "Add an objective" walk, done: its code block is run as written, the class registered, and the
new term must then train like any other - built from the config, summed with its weight, computed a micro-batch of
rows at a time under contrastive accumulation (equal to one batch), and named on the model card."""

import copy
import re

import pytest
import torch

from conftest import REPO, make_batch
from modeling_lightclip import LightCLIPModel
from modeling_lightclip import objectives_lightclip
from modeling_lightclip.objectives_lightclip import OBJECTIVES, register_objective, training_targets_from
from modeling_lightclip.training.accumulation import ContrastiveAccumulation
from modeling_lightclip.training.recipes import build_model_config


def _walk_objective():
    text = (REPO / "CONTRIBUTING.md").read_text()
    section = text[text.index("## Add an objective"):text.index("## Layout")]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, "the walk shows one code block"
    code = "\n".join(line[3:] if line.startswith("   ") else line for line in blocks[0].splitlines())
    namespace = dict(vars(objectives_lightclip))  # the block is written inside objectives_lightclip.py
    before = set(namespace)
    exec(compile(code, "CONTRIBUTING.md", "exec"), namespace)
    (name,) = set(namespace) - before
    return namespace[name]


@pytest.fixture()
def walked_objective():
    objective = _walk_objective()
    register_objective(objective)
    try:
        yield objective
    finally:
        OBJECTIVES.remove(objective)


def test_the_walks_objective_trains_like_any_other(walked_objective, tiny_recipe, tokenizer):
    (term, field), = walked_objective.weights.items()
    config = build_model_config(tiny_recipe["model"], tokenizer, token_loss_weight=0.0, mlm_loss_weight=0.0,
                                **{field: 0.5})
    torch.manual_seed(0)
    model = LightCLIPModel(config).eval()  # BatchNorm's running statistics and no dropout: micro-batches = one batch
    assert isinstance(getattr(model.objectives, walked_objective.slot), walked_objective)
    assert config.loss_weights() == {term: 0.5}
    batch = make_batch(tokenizer, batch_size=6)

    reference = copy.deepcopy(model)
    out = reference(**batch, return_loss=True)
    out.loss.backward()
    # oracle: the mean over the batch of each pair's squared distance, from the embeddings the model returned
    expected = (out.image_embeds - out.text_embeds).pow(2).sum(-1).mean()
    torch.testing.assert_close(out.losses[term], expected)
    torch.testing.assert_close(out.loss, out.losses["instance"] + 0.5 * expected)

    assert model.objectives.row_decomposable
    inputs = {k: v for k, v in batch.items()}
    inputs["training_targets"] = training_targets_from({}, {})
    terms = ContrastiveAccumulation(2).step(model, inputs)
    torch.testing.assert_close(terms[term], out.losses[term].detach())
    torch.testing.assert_close(terms["loss"], out.loss.detach())
    for name, parameter in reference.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(dict(model.named_parameters())[name].grad, parameter.grad, rtol=1e-4,
                                       atol=1e-5, msg=name)

    from modeling_lightclip.training.hub import _objectives_table

    assert f"| {walked_objective.title} | 0.5 |" in _objectives_table(config)


def test_a_config_without_a_registered_objectives_field_leaves_it_off(walked_objective, tiny_recipe, tokenizer):
    config = build_model_config(tiny_recipe["model"], tokenizer)
    model = LightCLIPModel(config)
    assert getattr(model.objectives, walked_objective.slot) is None
    (term, _), = walked_objective.weights.items()
    assert term not in config.loss_weights()
