"""PyTorch LightCLIP model: a lightweight dual encoder whose multi-level training losses live in `forward`.

The inference path is exactly a dual encoder: image tower -> pooled vector -> `visual_projection`, text tower ->
pooled vector -> `text_projection`, cosine similarity scaled by `logit_scale`. Every training-only module (token
projections, fusion module, MLM head, neighbour memory bank) lives under `self.objectives` and is touched only
when `forward(return_loss=True)` runs in training.

Saved beside the weights as remote code: imports only torch and transformers at top level. The training objectives
are not saved with it (they come with the LightCLIP package): a model loaded from its folder alone embeds, scores and
classifies, and `return_loss=True` says what to install.
"""

import contextlib
import copy
import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

from .configuration_lightclip import LightCLIPConfig, training_objectives


logger = logging.get_logger(__name__)

_AUTO_MAP_CLASSES = ("AutoModel", "AutoModelForZeroShotImageClassification")


def _objectives_for(what: str):
    """The training objectives' module, for `what` (a sentence saying what needs it); a folder loaded from the Hub
    holds the inference code only, and the objectives come with the LightCLIP package."""
    objectives = training_objectives()
    if objectives is None:
        raise ImportError(f"{what} needs LightCLIP's training objectives, which come with the LightCLIP package "
                          "(https://github.com/lightclip/lightclip), not with a model's Hub folder: install it and "
                          "load the model with it, or call the model without `return_loss` for embeddings and logits.")
    return objectives


def feature_map_tokens(features: torch.Tensor, num_prefix_tokens: int = 0) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W, C); a token sequence (B, L, C) -> (B, L - prefix, C)."""
    if features.dim() == 4:
        return features.flatten(2).transpose(1, 2)
    return features[:, num_prefix_tokens:]


@dataclass
class LightCLIPOutput(ModelOutput):
    """
    Output of [`LightCLIPModel.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*, returned when `return_loss=True`):
            Weighted sum of the enabled training objectives.
        logits_per_image (`torch.FloatTensor` of shape `(image_batch_size, text_batch_size)`):
            Scaled cosine similarities image x text.
        logits_per_text (`torch.FloatTensor` of shape `(text_batch_size, image_batch_size)`):
            The transpose of `logits_per_image`.
        text_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised projected text embeddings.
        image_embeds (`torch.FloatTensor` of shape `(batch_size, projection_dim)`):
            L2-normalised projected image embeddings.
        losses (`dict[str, torch.FloatTensor]`, *optional*):
            Each objective's unweighted term (e.g. `instance`, `token`, `mlm`), for logging.
        image_tokens (`torch.FloatTensor` of shape `(batch_size, num_patches, vision_hidden)`, *optional*):
            Image patch tokens (a CNN's feature map flattened to H*W tokens, a ViT's tokens without prefix tokens),
            returned with `output_tokens=True`.
        text_tokens (`torch.FloatTensor` of shape `(batch_size, seq_len, text_hidden)`, *optional*):
            Text token states, returned with `output_tokens=True`.
        text_word_mask (`torch.BoolTensor` of shape `(batch_size, seq_len)`, *optional*):
            True at real word tokens (special and padding tokens excluded), returned with `output_tokens=True`.
        text_model_output (`BaseModelOutputWithPooling`):
            The text tower's raw output.
        vision_model_output (`BaseModelOutputWithPooling`):
            The image tower's raw output.
    """

    loss: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None
    logits_per_text: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    losses: dict | None = None
    image_tokens: torch.FloatTensor | None = None
    text_tokens: torch.FloatTensor | None = None
    text_word_mask: torch.BoolTensor | None = None
    text_model_output: Any = None
    vision_model_output: Any = None

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(
            self[k] if k not in ["text_model_output", "vision_model_output"] else getattr(self, k).to_tuple()
            for k in self.keys()
        )


@dataclass
class _VisionEncoding:
    """What one image-tower pass yields: pooled vector, patch tokens, per-stage features, raw output."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    stages: tuple | None
    raw: Any


@dataclass
class _TextEncoding:
    pooled: torch.Tensor
    tokens: torch.Tensor
    raw: Any


@contextlib.contextmanager
def _batchnorm_running_stats_if(condition: bool, module: nn.Module):
    """A batch of one image has no batch statistics at a 1x1 feature map: let BatchNorm use its running
    statistics for that call (and leave them untouched) instead of failing."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training] if condition else []
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


def _build_tower(config) -> PreTrainedModel:
    """`AutoModel.from_config`, without the towers' task poolers (BERT/ViT `add_pooling_layer`): LightCLIP pools
    itself, and a pooler nobody trains would leave parameters without gradients under DDP."""
    try:
        model_class = AutoModel._model_mapping[type(config)]
    except KeyError as err:
        raise ValueError(
            f"No transformers AutoModel for tower config {type(config).__name__} (model_type "
            f"{getattr(config, 'model_type', '?')!r}); pick a tower type AutoModel supports."
        ) from err
    kwargs = {}
    if "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False
    return AutoModel.from_config(config, **kwargs)


def tower_layer_groups(tower: nn.Module) -> list[list[tuple[str, nn.Parameter]]]:
    """A tower's parameters in groups, input side first, for partial locking (OpenCLIP's `unlocked_groups`): the
    stem (everything before the tower's main list of blocks), each block of that list (ResNet/timm stages, MobileNet
    and EfficientNet blocks, ViT/BERT/CLIP layers), and the head (final norm, head convolution), when there is one.
    The main list is the `ModuleList`/`Sequential` of two or more children that holds the most parameters (the
    shallowest one on a tie), so one rule serves every transformers and timm backbone."""
    best, best_count = None, 0
    for name, module in tower.named_modules():
        if not isinstance(module, (nn.ModuleList, nn.Sequential)) or len(module) < 2:
            continue
        count = sum(p.numel() for p in module.parameters())
        if count > best_count:
            best, best_count = name, count
    named = list(tower.named_parameters())
    if best is None:
        return [named]
    prefix = f"{best}." if best else ""
    stem, blocks, head = [], {}, []
    for name, param in named:
        if name.startswith(prefix):
            blocks.setdefault(name[len(prefix):].split(".")[0], []).append((name, param))
        elif blocks:
            head.append((name, param))
        else:
            stem.append((name, param))
    return [group for group in (stem, *blocks.values(), head) if group]


@dataclass
class VisionTowerShapes:
    """Shapes of a vision tower's outputs at a given resolution, probed on the meta device (no compute, no memory).

    feature_dim: hidden size of the tokens of the last hidden state; pooled_dim: size of the pooled vector;
    stage_dims: hidden size of each entry of `hidden_states`; num_prefix_tokens: CLS/distillation/register tokens
    in front of a ViT's patch tokens; num_tokens: patch tokens of the last hidden state.
    """

    feature_dim: int
    pooled_dim: int
    has_pooler: bool
    is_feature_map: bool
    stage_dims: list
    stage_num_tokens: list
    num_prefix_tokens: int
    num_tokens: int


def _tower_load_kwargs(name: str, extra: dict) -> dict:
    """`from_pretrained` kwargs for a tower checkpoint, its config loaded once and passed along (`config`). A timm Hub
    repo written by timm's `save_for_hf` repeats `num_classes` in `model_args`, which `TimmWrapperModel` (built
    headless, num_classes=0) then receives twice: drop it there (the wrapper keeps no classifier either way)."""
    if "config" in extra:
        return extra
    config = AutoConfig.from_pretrained(name, **{k: v for k, v in extra.items() if k in ("revision", "token")})
    if getattr(config, "model_type", None) == "timm_wrapper" and "num_classes" in (config.model_args or {}):
        config.model_args = {k: v for k, v in config.model_args.items() if k != "num_classes"}
    return {**extra, "config": config}


def _from_pretrained_without(model_class, unexpected: str | None, name: str, kwargs: dict) -> PreTrainedModel:
    """`AutoModel.from_pretrained`, with the checkpoint's weights matching `unexpected` (a regex: the task pooler the
    tower is built without) loaded into nothing and left out of the load report, which would otherwise call them
    unexpected."""
    if unexpected is None:
        return AutoModel.from_pretrained(name, **kwargs)
    original = model_class.__dict__.get("_keys_to_ignore_on_load_unexpected")
    model_class._keys_to_ignore_on_load_unexpected = [*(original or []), unexpected]
    try:
        return AutoModel.from_pretrained(name, **kwargs)
    finally:
        if original is None:
            del model_class._keys_to_ignore_on_load_unexpected
        else:
            model_class._keys_to_ignore_on_load_unexpected = original


def _probe_or_explain(config) -> VisionTowerShapes:
    """The tower's shapes at `config.image_size`, with the stage indices the config reads checked against them;
    a size the tower cannot take, or a stage it does not have, is one message naming the field."""
    try:
        shapes = probe_vision_tower(config.vision_config, config.image_size)
    except (RuntimeError, ValueError, IndexError) as err:
        raise ValueError(f"image_size={config.image_size} (--image_size) does not fit the "
                         f"{config.vision_config.model_type} image tower ({type(err).__name__}: "
                         f"{str(err).splitlines()[0][:200]}): use a larger size.") from None
    stages = len(shapes.stage_dims)
    objectives = training_objectives()
    fuses = objectives is not None and objectives.MaskedLanguageModelling.enabled(config) and config.mlm_fusion
    fields = {"vision_token_stage": [config.vision_token_stage] if config.vision_token_stage is not None else [],
              "fusion_vision_stages": list(config.fusion_vision_stages) if fuses else []}
    for name, values in fields.items():
        bad = [v for v in values if not -stages <= v < stages]
        if bad:
            raise ValueError(f"{name}={getattr(config, name)} (--{name}): the image tower has {stages} stages "
                             f"(hidden_states), so a stage index lies in [-{stages}, {stages - 1}].")
    return shapes


def probe_vision_tower(vision_config, image_size: int) -> VisionTowerShapes:
    """Run the tower once on the meta device to read its output shapes; works for any transformers backbone."""
    config = copy.deepcopy(vision_config)
    with torch.device("meta"):
        tower = _build_tower(config).eval()
        num_channels = getattr(config, "num_channels", 3)
        out = tower(torch.empty(1, num_channels, image_size, image_size), output_hidden_states=True, return_dict=True)
    last = out.last_hidden_state
    pooler = getattr(out, "pooler_output", None)
    is_map = last.dim() == 4
    hidden_states = out.hidden_states or (last,)

    def _dim_and_tokens(t):
        return (t.shape[1], t.shape[2] * t.shape[3]) if t.dim() == 4 else (t.shape[-1], t.shape[1])

    patch_size = getattr(config, "patch_size", None)
    prefix = 0
    if not is_map and isinstance(patch_size, int) and patch_size > 0:
        prefix = max(last.shape[1] - (image_size // patch_size) ** 2, 0)
    feature_dim, num_tokens = _dim_and_tokens(last)
    return VisionTowerShapes(
        feature_dim=feature_dim,
        pooled_dim=pooler.flatten(1).shape[1] if pooler is not None else feature_dim,
        has_pooler=pooler is not None,
        is_feature_map=is_map,
        stage_dims=[_dim_and_tokens(h)[0] for h in hidden_states],
        stage_num_tokens=[_dim_and_tokens(h)[1] - (0 if h.dim() == 4 else prefix) for h in hidden_states],
        num_prefix_tokens=prefix,
        num_tokens=num_tokens - prefix,
    )


class LightCLIPPreTrainedModel(PreTrainedModel):
    config_class = LightCLIPConfig
    config: LightCLIPConfig
    base_model_prefix = "lightclip"
    main_input_name = "pixel_values"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    # Trainer: the MLM/PING inputs are not token-count-normalised labels; never rescale our loss.
    accepts_loss_kwargs = False
    # Training-only modules may be left out of an inference checkpoint (config.save_training_modules=False).
    _keys_to_ignore_on_load_missing = [r"^objectives\."]
    _keys_to_ignore_on_load_unexpected = [r"^objectives\."]  # a checkpoint with training modules, read for inference

    @torch.no_grad()
    def initialize_weights(self):
        """The towers' own initialisation, then (config.cnn_init == "kaiming") the standard from-scratch init of
        convolutional towers: Kaiming-normal convolutions, unit-weight/zero-bias normalisation layers. Some
        transformers backbones (EfficientNet, for one) draw BatchNorm weights from N(0, 0.02), which makes a
        freshly built tower output zeros. Only tensors not loaded from a checkpoint are touched."""
        super().initialize_weights()
        if getattr(self.config, "cnn_init", "kaiming") != "kaiming":
            return
        for tower in (getattr(self, "vision_model", None), getattr(self, "text_model", None)):
            if tower is None:
                continue
            for module in tower.modules():
                if isinstance(module, nn.Conv2d):
                    init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                    if module.bias is not None:
                        init.zeros_(module.bias)
                elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)) and module.weight is not None:
                    init.ones_(module.weight)
                    init.zeros_(module.bias)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, LightCLIPModel):
            init.normal_(module.visual_projection.weight, std=module.vision_embed_dim**-0.5)
            init.normal_(module.text_projection.weight, std=module.text_embed_dim**-0.5)
            init.constant_(module.logit_scale, module.config.logit_scale_init_value)
            if module.logit_bias is not None:
                init.constant_(module.logit_bias, module.config.logit_bias_init_value)


class LightCLIPModel(LightCLIPPreTrainedModel):
    r"""
    Lightweight CLIP: any transformers image tower + any text tower, trained with LightCLIP's multi-level
    objectives and CLIP-PING's neighbour guidance.

    Loading a trained model::

        model = AutoModel.from_pretrained("org/lightclip-resnet18", trust_remote_code=True)
        pipe = pipeline("zero-shot-image-classification", model="org/lightclip-resnet18", trust_remote_code=True)
    """

    def __init__(self, config: LightCLIPConfig, vision_model: PreTrainedModel | None = None,
                 text_model: PreTrainedModel | None = None):
        super().__init__(config)
        self.vision_model = vision_model if vision_model is not None else _build_tower(config.vision_config)
        self.text_model = text_model if text_model is not None else _build_tower(config.text_config)
        # Keep one config object per tower so that updates (e.g. attention implementation) stay in sync.
        self.vision_model.config = self.config.vision_config
        self.text_model.config = self.config.text_config

        self.vision_shapes = _probe_or_explain(config)
        self.vision_embed_dim = self.vision_shapes.pooled_dim
        self.text_embed_dim = config.text_config.hidden_size
        self._text_tower_inputs = set(inspect.signature(self.text_model.forward).parameters)
        self.visual_projection = nn.Linear(self.vision_embed_dim, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(self.text_embed_dim, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        # the sigmoid loss's learnable bias (SigLIP); it shifts every logit alike, so softmax models have none
        self.logit_bias = (nn.Parameter(torch.tensor(float(config.logit_bias_init_value)))
                           if config.uses_sigmoid_loss else None)

        stage = config.vision_token_stage
        vision_token_dim = self.vision_shapes.feature_dim if stage is None else self.vision_shapes.stage_dims[stage]
        # Training-only: token projections, fusion module, MLM head. Never run on the inference path, and absent
        # where the objectives are not installed (a model loaded from its Hub folder alone).
        objectives = training_objectives()
        self.objectives = None if objectives is None else objectives.LightCLIPObjectives(
            config, vision_token_dim, self.vision_shapes.stage_dims, self.text_embed_dim)
        if self._trains_mlm:
            if config.mask_token_id is None:
                raise ValueError("mlm_loss_weight > 0 needs a mask token: the tokenizer has none (set "
                                 "config.mask_token_id, use a tokenizer with [MASK], or set mlm_loss_weight=0).")
            objectives.find_text_layers(self.text_model, config.text_config.num_hidden_layers)  # fail now
        # Training progress in [0, 1] for the progressive soft labels; set by a TrainerCallback or by hand.
        self.training_progress = 0.0
        self._channels_last = False  # see `set_channels_last`; a runtime choice, not saved
        self._locked_towers = {}     # see `lock_image_tower` / `lock_text_tower`; a runtime choice, not saved
        self.post_init()

    # ---------------------------------------------------------------------------------------------- towers

    def _encode_image(self, pixel_values: torch.Tensor, output_stages: bool = False) -> _VisionEncoding:
        if self._channels_last and pixel_values.dim() == 4:
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
        with _batchnorm_running_stats_if(self.training and pixel_values.shape[0] == 1, self.vision_model), \
                self._tower_context("vision"):
            out = self.vision_model(pixel_values=pixel_values, output_hidden_states=output_stages, return_dict=True)
        last = out.last_hidden_state
        shapes = self.vision_shapes
        tokens = feature_map_tokens(last, shapes.num_prefix_tokens)
        mode = self.config.vision_pooling
        pooler = getattr(out, "pooler_output", None)
        if mode == "auto":
            mode = "pooler" if pooler is not None else ("mean" if last.dim() == 4 else "cls")
        if mode == "pooler":
            if pooler is None:
                raise ValueError("vision_pooling='pooler' but the image tower returns no pooler_output.")
            pooled = pooler.flatten(1)
        elif mode == "cls":
            if last.dim() == 4:
                raise ValueError("vision_pooling='cls' needs a token-sequence tower (ViT-like), not a CNN.")
            pooled = last[:, 0]
        else:
            pooled = tokens.mean(dim=1)
        return _VisionEncoding(pooled=pooled, tokens=tokens, stages=out.hidden_states, raw=out)

    def _encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                     **tower_kwargs) -> _TextEncoding:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        max_positions = getattr(self.config.text_config, "max_position_embeddings", None)
        if max_positions is not None and input_ids.shape[1] > max_positions:
            raise ValueError(
                f"captions of {input_ids.shape[1]} tokens exceed the text tower's {max_positions} positions: "
                f"tokenise with truncation=True, max_length={max_positions}."
            )
        tower_kwargs = {k: v for k, v in tower_kwargs.items() if v is not None and k in self._text_tower_inputs}
        with self._tower_context("text"):
            out = self.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True,
                                  **tower_kwargs)
        tokens = out.last_hidden_state
        mode = self.config.text_pooling
        pooler = getattr(out, "pooler_output", None)
        if mode == "auto":
            mode = "pooler" if self.config.text_config.model_type == "clip_text_model" else "mean"
        if mode in ("pooler", "eos"):
            if pooler is None:
                raise ValueError(f"text_pooling={self.config.text_pooling!r} but the text tower has no pooler output.")
            pooled = pooler
        elif mode == "cls":
            pooled = tokens[:, 0]
        else:
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return _TextEncoding(pooled=pooled, tokens=tokens, raw=out)

    def _encode_text_and_masked_copy(self, input_ids, attention_mask, text_kwargs: dict, masked: tuple,
                                     image_stages: tuple) -> tuple[_TextEncoding, torch.Tensor]:
        """One text-tower call for the captions and their masked copies (MLM): the copies are appended as extra
        rows, and the fusion blocks inject the unmasked images' features into those rows only. Returns the plain
        captions' encoding and the masked rows' states."""
        masked_ids, masked_attention, _, masked_kwargs, rows = masked
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        joint_kwargs = {k: torch.cat([v, masked_kwargs[k]]) for k, v in text_kwargs.items()}
        layers = training_objectives().find_text_layers(self.text_model, self.config.text_config.num_hidden_layers)
        with self.objectives.mlm.fusing(layers, tuple(feature_map_tokens(stage[rows]) for stage in image_stages),
                                        start_row=batch):
            joint = self._encode_text(torch.cat([input_ids, masked_ids]), torch.cat([attention_mask, masked_attention]),
                                      **joint_kwargs)
        raw = joint.raw
        pooler = getattr(raw, "pooler_output", None)
        plain_raw = BaseModelOutputWithPooling(last_hidden_state=raw.last_hidden_state[:batch],
                                               pooler_output=pooler[:batch] if pooler is not None else None)
        return _TextEncoding(pooled=joint.pooled[:batch], tokens=joint.tokens[:batch], raw=plain_raw), \
            joint.tokens[batch:]

    def _token_alignment_tokens(self, vision: _VisionEncoding) -> torch.Tensor:
        """Patch tokens of the stage the token alignment reads (`config.vision_token_stage`; None = last)."""
        stage = self.config.vision_token_stage
        if stage is None:
            return vision.tokens
        return feature_map_tokens(vision.stages[stage], self.vision_shapes.num_prefix_tokens)

    def text_word_mask(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """True at real word tokens: attended, and not a CLS/SEP/BOS/EOS/PAD/MASK token."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        special = self.config.special_token_ids()
        if special:
            mask &= ~torch.isin(input_ids, torch.tensor(special, device=input_ids.device))
        return mask

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs) -> BaseModelOutputWithPooling:
        """Image tower + projection. As transformers 5's `CLIPModel`, returns the tower output with `pooler_output`
        replaced by the projected (not yet normalised) image embedding."""
        enc = self._encode_image(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=enc.raw.last_hidden_state,
                                          pooler_output=self.visual_projection(enc.pooled))

    def get_text_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                          **kwargs) -> BaseModelOutputWithPooling:
        """Text tower + projection; `pooler_output` is the projected (not yet normalised) text embedding."""
        enc = self._encode_text(input_ids, attention_mask, token_type_ids=token_type_ids, position_ids=position_ids)
        return BaseModelOutputWithPooling(last_hidden_state=enc.tokens,
                                          pooler_output=self.text_projection(enc.pooled))

    @property
    def is_convolutional(self) -> bool:
        """Whether the image tower is a CNN (its last hidden state is a feature map): the towers channels-last
        memory format speeds up."""
        return self.vision_shapes.is_feature_map

    def _set_gradient_checkpointing(self, enable: bool = True, gradient_checkpointing_func=None, **kwargs):
        """`gradient_checkpointing_enable()` / `--gradient_checkpointing`: transformers' switch reaches the towers
        whose layers support it (ViT/CLIP/BERT-style encoders); a timm image tower gets timm's own switch
        (`set_grad_checkpointing`). A tower with neither (transformers' ResNet, MobileNetV2, EfficientNet) keeps all
        its activations, with a warning naming it."""
        if gradient_checkpointing_func is not None:
            kwargs["gradient_checkpointing_func"] = gradient_checkpointing_func
        super()._set_gradient_checkpointing(enable, **kwargs)
        self.gradient_checkpointing_towers = {}
        for side, tower in (("image", self.vision_model), ("text", self.text_model)):
            timm_model = getattr(tower, "timm_model", None)
            if timm_model is not None and hasattr(timm_model, "set_grad_checkpointing"):
                timm_model.set_grad_checkpointing(enable)
                self.gradient_checkpointing_towers[side] = enable
            else:
                self.gradient_checkpointing_towers[side] = enable and any(
                    getattr(module, "gradient_checkpointing", False) for module in tower.modules())
            if enable and not self.gradient_checkpointing_towers[side]:
                logger.warning("gradient checkpointing: the %s tower (%s) does not support it and keeps all its "
                               "activations; the other tower and contrastive accumulation (--micro_batch_size) still "
                               "save memory.", side, type(tower).__name__)

    def set_channels_last(self, enabled: bool = True) -> "LightCLIPModel":
        """Keep the image tower's weights, and the images given to it, in channels-last memory format (NHWC
        strides), the layout cuDNN's fast convolution kernels want. Only strides change: outputs equal the NCHW
        ones within float tolerance and the saved weights are the same bytes. A runtime choice, not saved."""
        self.vision_model.to(memory_format=torch.channels_last if enabled else torch.contiguous_format)
        self._channels_last = bool(enabled)
        return self

    # ---------------------------------------------------------------------------------------------- locking

    def lock_image_tower(self, unlocked_groups: int = 0, freeze_norm_stats: bool = True) -> "LightCLIPModel":
        """Lock the image tower (LiT, OpenCLIP's `--lock-image`): no gradient for its parameters (so the optimizer
        keeps no state for them and its weights stay bit for bit), and, with `freeze_norm_stats`, its BatchNorm
        layers kept in eval mode (running statistics unchanged). `unlocked_groups` leaves the last N groups of
        `tower_layer_groups` (head, then the last stages/blocks) trainable. A runtime choice, not saved."""
        return self._lock_tower("vision", unlocked_groups, freeze_norm_stats)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_norm_stats: bool = True) -> "LightCLIPModel":
        """Lock the text tower (OpenCLIP's `--lock-text`); `unlocked_layers` leaves its last N groups (the final
        norm where the tower has one, then the last transformer layers) trainable. See `lock_image_tower`."""
        return self._lock_tower("text", unlocked_layers, freeze_norm_stats)

    def _lock_tower(self, side: str, unlocked: int, freeze_norm_stats: bool) -> "LightCLIPModel":
        tower = self.vision_model if side == "vision" else self.text_model
        groups = tower_layer_groups(tower)
        if not 0 <= int(unlocked) < len(groups):
            raise ValueError(f"{unlocked} unlocked groups for the {side} tower: it has {len(groups)} groups (stem, "
                             f"blocks, head), so choose 0 to {len(groups) - 1} (0 locks it whole).")
        locked = [param for group in groups[: len(groups) - int(unlocked)] for _, param in group]
        for param in locked:
            param.requires_grad_(False)
        locked_ids = {id(param) for param in locked}
        norms = [m for m in tower.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and any(id(p) in locked_ids for p in m.parameters(recurse=False))] if freeze_norm_stats else []
        self._locked_towers[side] = {"unlocked": int(unlocked), "groups": len(groups), "norms": norms}
        self.train(self.training)
        return self

    @property
    def locked_towers(self) -> dict:
        """`{"vision"|"text": {"unlocked": N, "groups": M}}` for each locked tower."""
        return {side: {k: v for k, v in info.items() if k != "norms"} for side, info in self._locked_towers.items()}

    def _tower_context(self, side: str):
        """`torch.no_grad()` for a tower locked whole (nothing in it, nor before it, needs a gradient); the text
        tower keeps its graph when MLM's fusion blocks run inside it."""
        info = self._locked_towers.get(side)
        if info is None or info["unlocked"] or not self.training or (side == "text" and self._trains_mlm):
            return contextlib.nullcontext()
        return torch.no_grad()

    def train(self, mode: bool = True):
        """`nn.Module.train`, keeping the BatchNorm layers of locked tower parts in eval mode, and a tower locked
        whole in eval mode altogether (no dropout: a fixed feature extractor, whose outputs can then be stored)."""
        super().train(mode)
        for side, info in getattr(self, "_locked_towers", {}).items():
            if not info["unlocked"]:
                (self.vision_model if side == "vision" else self.text_model).eval()
            for norm in info["norms"]:
                norm.eval()
        return self

    def check_text_outputs_storable(self) -> None:
        """Raise unless the text tower's pooled outputs can stand in for running it in training: the tower is locked
        whole (so its outputs never change) and no objective reads its token states (MLM, token alignment)."""
        info = self._locked_towers.get("text")
        if info is None or info["unlocked"]:
            raise ValueError("the text tower's outputs can be stored with the training rows only when the tower is "
                             "locked whole (--lock_text_tower without --lock_text_unlocked_layers): a tower that "
                             "trains changes them at every step.")
        if self._trains_mlm or (self.objectives is not None and self.objectives.needs_tokens):
            raise ValueError("MLM and token alignment read the text tower's token states, not only its pooled output: "
                             "switch them off (--mlm_loss_weight 0 --token_loss_weight 0) to store the text tower's "
                             "outputs, or let the tower run.")

    @torch.no_grad()
    def locked_text_outputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                            **tower_kwargs) -> torch.Tensor:
        """(B, H) pooled outputs of the locked text tower, before the projection: what training computes for these
        captions, and what `training_targets["text_tower_outputs"]` may carry instead (stored with each row)."""
        self.check_text_outputs_storable()
        return self._encode_text(input_ids, attention_mask, **tower_kwargs).pooled

    # ---------------------------------------------------------------------------------------------- training

    def set_training_progress(self, progress: float) -> None:
        """Fraction of training done, in [0, 1]; drives the progressive soft labels and MLM's delayed start."""
        self.training_progress = min(max(float(progress), 0.0), 1.0)

    @property
    def _trains_mlm(self) -> bool:
        """Whether MLM is among the objectives (its fusion blocks then run inside the text tower in training)."""
        return self.objectives is not None and self.objectives.mlm is not None

    @property
    def soft_label_alpha(self) -> float:
        """The soft labels' weight at this point of training (0 without soft labels)."""
        return 0.0 if self.objectives is None else self.objectives.soft_label_alpha(self.training_progress)

    def mask_for_mlm(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT-style masking with the config's mask and special token ids (the collator's rule too)."""
        return _objectives_for("MLM masking").mask_for_mlm(self.config, input_ids, attention_mask, generator)

    @torch.no_grad()
    def clamp_logit_scale_(self) -> None:
        """Clamp the log temperature to [0, logit_scale_max] (ln 100 by default), as CLIP does after each step."""
        self.logit_scale.clamp_(0.0, self.config.logit_scale_max)

    # ---------------------------------------------------------------------------------------------- forward

    def _encode_pair(self, input_ids, pixel_values, attention_mask, text_kwargs: dict, targets: dict,
                     for_objectives: bool, first_row: int | None):
        """Both towers on one batch: (image embeddings, text embeddings, image encoding, text encoding, the
        `TrainingFeatures` for the objectives or None). With `for_objectives`, the features the enabled objectives
        read (token states, MLM's fused masked captions) are computed too; otherwise only the embeddings."""
        objectives = _objectives_for("computing the training loss") if for_objectives else None
        needs_tokens = for_objectives and self.objectives.needs_tokens
        vision = self._encode_image(pixel_values, output_stages=for_objectives and self.objectives.needs_image_stages)
        masked = None
        if for_objectives:
            if first_row is None and self.objectives.mlm_active(self.training_progress):
                first_row = objectives.first_global_row(input_ids.shape[0], input_ids.device)  # after earlier ranks
            masked = self.objectives.mlm_inputs(input_ids, attention_mask, text_kwargs, targets.get("mlm_input_ids"),
                                                targets.get("mlm_labels"), self.training_progress, first_row)
        stored_text = targets.get("text_tower_outputs") if self.training else None
        masked_states = None
        if stored_text is not None:  # the locked text tower's outputs, stored with the rows: the tower need not run
            self.check_text_outputs_storable()
            text = _TextEncoding(pooled=stored_text.to(self.text_projection.weight.dtype), tokens=None, raw=None)
        elif masked is None:
            text = self._encode_text(input_ids, attention_mask, **text_kwargs)
        elif masked[4].numel() == 0:  # MLM is on, but none of this batch's rows is picked: no masked rows here
            text = self._encode_text(input_ids, attention_mask, **text_kwargs)
            masked_states = text.tokens.new_zeros((0, *text.tokens.shape[1:]))
        else:
            text, masked_states = self._encode_text_and_masked_copy(input_ids, attention_mask, text_kwargs, masked,
                                                                    vision.stages)
        image_embeds = F.normalize(self.visual_projection(vision.pooled), dim=-1)
        text_embeds = F.normalize(self.text_projection(text.pooled), dim=-1)
        features = None if objectives is None else objectives.TrainingFeatures(
            image_embeds=image_embeds,
            text_embeds=text_embeds,
            image_tokens=self._token_alignment_tokens(vision) if needs_tokens else None,
            text_tokens=text.tokens if needs_tokens else None,
            word_mask=self.text_word_mask(input_ids, attention_mask) if needs_tokens else None,
            masked_states=masked_states,
            mlm_labels=masked[2] if masked is not None else None,
            mlm_rows=masked[4] if masked is not None else None,
        )
        return image_embeds, text_embeds, vision, text, features

    def _training_targets(self, training_targets: dict | None, keywords: dict) -> dict:
        """The training targets given to `forward` as one dict (see `objectives_lightclip.TRAINING_TARGETS`)."""
        if not training_targets and not keywords:
            return {}
        return _objectives_for("passing training targets").training_targets_from(training_targets, keywords)

    def training_features(self, input_ids: torch.Tensor, pixel_values: torch.Tensor,
                          attention_mask: torch.Tensor | None = None, training_targets: dict | None = None,
                          first_row: int | None = None, **text_inputs):
        """What the towers hand the training objectives for this batch (`TrainingFeatures`); `first_row` is the
        batch's first row within the step's global batch (default: this process's share follows the earlier
        processes'), which fixes the rows MLM masks. `objective_terms(features)` turns them into the loss."""
        targets = self._training_targets(training_targets, {})
        text_kwargs = {k: v for k, v in text_inputs.items() if v is not None and k in self._text_tower_inputs}
        return self._encode_pair(input_ids, pixel_values, attention_mask, text_kwargs, targets, True, first_row)[-1]

    def objective_terms(self, features, training_targets: dict | None = None) -> dict:
        """The training objectives' named terms for the batch `features` describe, and their weighted sum (`loss`)."""
        _objectives_for("computing the training loss")
        return self.objectives(features, self.logit_scale.exp(), self.logit_bias,
                               soft_label_alpha=self.soft_label_alpha,
                               word_embeddings=self.text_model.get_input_embeddings().weight,
                               targets=self._training_targets(training_targets, {}))

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        training_targets: dict | None = None,
        output_tokens: bool = False,
        return_dict: bool | None = None,
        **targets,
    ) -> LightCLIPOutput | tuple:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): caption token ids.
            pixel_values (`torch.FloatTensor` of shape `(batch_size, channels, height, width)`): images.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*): 1 at real tokens.
            token_type_ids, position_ids (*optional*): passed to the text tower when it takes them.
            return_loss (`bool`, *optional*): compute the training objectives and return `loss` and `losses`.
            training_targets (`dict[str, torch.Tensor]`, *optional*): the per-sample inputs of the training
                objectives, from the collator; each objective reads what it needs (`TRAINING_TARGETS` in
                `objectives_lightclip` lists the keys: teacher features and embeddings, MLM's masked copies,
                CLIP-PING's ids and partners). The same keys are also accepted as keyword arguments.
            output_tokens (`bool`, *optional*): also return image patch tokens and text token states.
        """
        targets = self._training_targets(training_targets, targets)
        if input_ids is None or pixel_values is None:
            raise ValueError("LightCLIPModel.forward needs both `input_ids` and `pixel_values`.")
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        text_kwargs = {k: v for k, v in (("token_type_ids", token_type_ids), ("position_ids", position_ids))
                       if v is not None and k in self._text_tower_inputs}
        image_embeds, text_embeds, vision, text, features = self._encode_pair(
            input_ids, pixel_values, attention_mask, text_kwargs, targets, bool(return_loss), None)
        logits_per_text = self.logit_scale.exp() * text_embeds @ image_embeds.t()
        if self.logit_bias is not None:
            logits_per_text = logits_per_text + self.logit_bias
        logits_per_image = logits_per_text.t()

        loss, losses = None, None
        if return_loss:
            losses = self.objective_terms(features, targets)
            loss = losses.pop("loss")

        word_mask = self.text_word_mask(input_ids, attention_mask) if output_tokens else None
        output = LightCLIPOutput(
            loss=loss,
            logits_per_image=logits_per_image,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            losses=losses,
            image_tokens=vision.tokens if output_tokens else None,
            text_tokens=text.tokens if output_tokens else None,
            text_word_mask=word_mask,
            text_model_output=text.raw,
            vision_model_output=vision.raw,
        )
        return output if return_dict else output.to_tuple()

    # ---------------------------------------------------------------------------------------------- construction

    @classmethod
    def from_vision_text_pretrained(
        cls, vision_model_name_or_path: str | None, text_model_name_or_path: str | None, **kwargs
    ) -> "LightCLIPModel":
        """Build a LightCLIP model whose towers start from pretrained checkpoints (Hub ids or local folders).

        Either path may be None: that tower is then built from scratch from `vision_config` / `text_config` (a
        config or dict; required in that case, ignored otherwise). Other keyword arguments prefixed `vision_` /
        `text_` go to the towers' `from_pretrained`; the rest go to `LightCLIPConfig` (e.g. `projection_dim`,
        objective weights). Projections start fresh.
        """
        scratch = {"vision": kwargs.pop("vision_config", None), "text": kwargs.pop("text_config", None)}
        own = set(LightCLIPConfig.own_fields())  # vision_pooling etc. stay config fields
        vision_kwargs = {k[len("vision_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("vision_")
                         and k not in own}
        text_kwargs = {k[len("text_"):]: kwargs.pop(k) for k in list(kwargs) if k.startswith("text_") and k not in own}
        towers, tower_configs = [], []
        for side, name, extra in (("vision", vision_model_name_or_path, vision_kwargs),
                                  ("text", text_model_name_or_path, text_kwargs)):
            if name is None:
                if scratch[side] is None:
                    raise ValueError(f"no {side} tower: give {side}_model_name_or_path or {side}_config.")
                config = scratch[side]
                towers.append(None)
                tower_configs.append(config.to_dict() if hasattr(config, "to_dict") else dict(config))
                continue
            extra = _tower_load_kwargs(name, extra)
            model_class = AutoModel._model_mapping.get(type(extra["config"]), None)
            drops_pooler = (model_class is not None
                            and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters)
            if drops_pooler:
                extra = {"add_pooling_layer": False, **extra}  # LightCLIP pools itself (see `_build_tower`)
            model = _from_pretrained_without(model_class, r"^pooler\." if drops_pooler else None, name, extra)
            if hasattr(model, "vision_model") and getattr(model.config, "model_type", "") == "clip":
                raise ValueError(f"{name} is a full CLIP model; pass its vision or text tower checkpoint instead.")
            towers.append(model)
            tower_configs.append(model.config.to_dict())
        config = LightCLIPConfig(vision_config=tower_configs[0], text_config=tower_configs[1], **kwargs)
        return cls(config, vision_model=towers[0], text_model=towers[1])

    @classmethod
    def from_clip(cls, clip_model_or_path, config: LightCLIPConfig | None = None, **config_kwargs) -> "LightCLIPModel":
        """A LightCLIP holding a transformers `CLIPModel`'s weights - its two towers, both projections and the logit
        scale - so that its logits equal the CLIP model's, ready to be fine-tuned with any LightCLIP objective.

        `clip_model_or_path`: a `CLIPModel`, or a Hub id / folder of one. `config`: the LightCLIP config to use (as
        `LightCLIPConfig.from_clip_config` builds it); otherwise one is built with `config_kwargs` (objective fields,
        special token ids). Training-only modules start fresh. `hub.export_clip` writes it back as a `CLIPModel`."""
        from transformers import CLIPModel

        clip = clip_model_or_path
        if not isinstance(clip, PreTrainedModel):
            clip = CLIPModel.from_pretrained(clip_model_or_path)
        if getattr(clip.config, "model_type", None) != "clip":
            raise ValueError(f"from_clip takes a CLIPModel (model_type 'clip'), not a "
                             f"{getattr(clip.config, 'model_type', type(clip).__name__)!r} model.")
        config = config if config is not None else LightCLIPConfig.from_clip_config(clip.config, **config_kwargs)
        model = cls(config)
        # transformers 5's CLIPVisionModel / CLIPTextModel hold their layers directly, so CLIPModel's parameter names
        # (`vision_model.*`, `text_model.*`, the projections, `logit_scale`) are LightCLIP's own
        missing, unexpected = model.load_state_dict(clip.state_dict(), strict=False)
        missing = [k for k in missing if not k.startswith("objectives.") and not k.endswith("position_ids")]
        unexpected = [k for k in unexpected if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"this CLIP checkpoint does not map onto LightCLIP's towers: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}.")
        return model

    def save_pretrained(self, save_directory, *args, state_dict: dict | None = None, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus: the custom-code `auto_map` for AutoConfig, AutoModel and
        AutoModelForZeroShotImageClassification (the zero-shot pipeline loads through the latter), and, when
        `config.save_training_modules` is False, an inference-only checkpoint without the training modules."""
        module = self.__class__.__module__.split(".")[-1]
        config_module = self.config.__class__.__module__.split(".")[-1]
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map["AutoConfig"] = f"{config_module}.{self.config.__class__.__name__}"
        for auto_class in _AUTO_MAP_CLASSES:
            auto_map[auto_class] = f"{module}.{self.__class__.__name__}"
        self.config.auto_map = auto_map
        if self.config.save_training_modules:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        state_dict = state_dict if state_dict is not None else self.state_dict()
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("objectives.")}
        original = self.config
        inference_config = copy.deepcopy(original)
        objectives = training_objectives()
        for name in objectives.loss_weight_fields().values() if objectives is not None else ():
            setattr(inference_config, name, 0.0)
        self.config = inference_config
        try:
            return super().save_pretrained(save_directory, *args, state_dict=state_dict, **kwargs)
        finally:
            self.config = original


LightCLIPConfig.register_for_auto_class()
LightCLIPModel.register_for_auto_class("AutoModel")

__all__ = ["LightCLIPModel", "LightCLIPOutput", "LightCLIPPreTrainedModel", "probe_vision_tower",
           "tower_layer_groups"]
