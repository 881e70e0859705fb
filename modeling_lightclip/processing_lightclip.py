"""Processor for LightCLIP: an image processor and a tokenizer in one object, as `CLIPProcessor`.

Saved beside the weights as remote code, so `AutoProcessor.from_pretrained(dir, trust_remote_code=True)` returns
it. Its parts are standard transformers classes (e.g. `CLIPImageProcessor`, `BertTokenizerFast`), so
`AutoImageProcessor` and `AutoTokenizer` load them from the same folder without custom code; that is what the
zero-shot pipeline does.
"""

from transformers import ProcessorMixin


class LightCLIPProcessor(ProcessorMixin):
    r"""
    Wraps an image processor and a tokenizer. `processor(text=..., images=...)` returns `input_ids`,
    `attention_mask` and `pixel_values`, ready for [`LightCLIPModel`].

    Args:
        image_processor: any transformers image processor (the one the model was trained with).
        tokenizer: any transformers tokenizer whose vocabulary fits the text tower.
    """

    def __init__(self, image_processor=None, tokenizer=None, **kwargs):
        super().__init__(image_processor, tokenizer, **kwargs)


LightCLIPProcessor.register_for_auto_class("AutoProcessor")

__all__ = ["LightCLIPProcessor"]
