"""Folders saved by earlier versions of LightCLIP keep loading: each `tests/fixtures/saved_model_*` folder was written
by `tests/fixtures/make_saved_model.py` with the code of its version (and is never rewritten); today's code must read
its config without losing a field and give the embeddings and logits that code recorded for fixed inputs."""

import json
import sys
from pathlib import Path

import pytest
import torch


FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES))
FOLDERS = sorted(FIXTURES.glob("saved_model_*"))


def test_there_are_saved_folders_to_load():
    assert len(FOLDERS) >= 2, FOLDERS


@pytest.mark.parametrize("folder", FOLDERS, ids=[f.name for f in FOLDERS])
def test_a_folder_saved_by_an_earlier_version_loads_and_gives_its_recorded_outputs(folder):
    from make_saved_model import fixed_inputs, outputs_of

    from modeling_lightclip import LightCLIPConfig, LightCLIPModel, LightCLIPProcessor

    saved = json.loads((folder / "config.json").read_text())
    config = LightCLIPConfig.from_pretrained(folder)
    read = json.loads(json.dumps(config.to_dict()))  # as JSON holds it (its keys are strings)
    # every field the folder's config holds is read back with its value (none dropped or renamed silently)
    for key, value in saved.items():
        if key in ("transformers_version", "dtype", "architectures", "auto_map", "use_cache"):
            continue  # written by transformers itself, not LightCLIP fields
        if key in ("vision_config", "text_config"):
            for inner, inner_value in value.items():
                if inner not in ("transformers_version", "dtype"):
                    assert read[key].get(inner) == inner_value, (key, inner)
            continue
        assert read.get(key) == value, key
    model = LightCLIPModel.from_pretrained(folder)
    processor = LightCLIPProcessor.from_pretrained(folder)
    expected = json.loads((folder / "expected.json").read_text())
    got = outputs_of(model, fixed_inputs(processor, model.config.image_size))
    for name in ("image_embeds", "text_embeds", "logits_per_image"):
        torch.testing.assert_close(torch.tensor(got[name]), torch.tensor(expected[name]), atol=1e-5, rtol=1e-5,
                                   msg=name)
    assert (config.instance_loss == "sigmoid") == folder.name.endswith("_sigmoid")
