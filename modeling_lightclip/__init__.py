"""LightCLIP: small CLIP models trained with soft labels and relation distillation from frozen teacher encoders
(the recommended objective), with the LightCLIP and CLIP-PING papers' objectives available.

The remote-code set (saved beside every checkpoint; torch + transformers only): `configuration_lightclip`,
`modeling_lightclip`, `processing_lightclip` - what inference runs. The training objectives (`objectives_lightclip`)
and the trainer (`training`) come with the package only.
Importing this package also registers the classes with the transformers Auto classes, so a local
`AutoModel.from_pretrained(dir)` works without `trust_remote_code` when the package is installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification, AutoProcessor

from .configuration_lightclip import LightCLIPConfig
from .modeling_lightclip import LightCLIPModel, LightCLIPOutput, LightCLIPPreTrainedModel
from .processing_lightclip import LightCLIPProcessor


AutoConfig.register(LightCLIPConfig.model_type, LightCLIPConfig, exist_ok=True)
AutoModel.register(LightCLIPConfig, LightCLIPModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(LightCLIPConfig, LightCLIPModel, exist_ok=True)
AutoProcessor.register(LightCLIPConfig, LightCLIPProcessor, exist_ok=True)

__version__ = "0.1.0"

__all__ = [
    "LightCLIPConfig",
    "LightCLIPModel",
    "LightCLIPOutput",
    "LightCLIPPreTrainedModel",
    "LightCLIPProcessor",
]
