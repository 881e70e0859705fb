"""LightCLIP model configuration.

A `LightCLIPConfig` holds two sub-configs, one per tower, the way `VisionTextDualEncoderConfig` does:
`vision_config` may be any transformers vision backbone config (ResNet, MobileNetV2, EfficientNet, ViT,
MobileViT, ConvNeXt, CLIPVision, ...) and `text_config` any text encoder config (BERT-style, CLIPText, ...),
given as a config object or as a dict carrying `model_type`.

Beside the towers it holds the projection sizes and the fields of every training objective. The objective
fields only change what `forward(return_loss=True)` computes; the inference path (two towers, two
projections) never depends on them.

This file is saved beside the weights as remote code: it imports only transformers at top level. The training
objectives (`objectives_lightclip`) are not: they come with the LightCLIP package, and `training_objectives()` is the
one place the remote-code files reach them. A Hub folder thus carries what inference runs, and its config checks the
objective fields only where the objectives are installed (where they were checked when the model was trained).
"""

import dataclasses
import importlib
import math

from transformers import AutoConfig, PretrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)

MIN_TEMPERATURE = 1e-4                          # smallest temperature any loss divides by
MAX_LOG_LOGIT_SCALE = math.log(1 / MIN_TEMPERATURE)   # the largest logit scale is 1 / MIN_TEMPERATURE

TEXT_POOLING = ("auto", "cls", "mean", "eos", "pooler")
VISION_POOLING = ("auto", "cls", "mean", "pooler")
INSTANCE_LOSSES = ("softmax", "sigmoid")
# each instance loss's initial log logit scale when none is given: CLIP's ln(1/0.07), SigLIP's ln 10
DEFAULT_LOG_LOGIT_SCALE = {"softmax": math.log(1 / 0.07), "sigmoid": math.log(10.0)}

_DEFAULT_VISION = {"model_type": "resnet", "embedding_size": 32, "hidden_sizes": [32, 64, 128, 256],
                   "depths": [1, 1, 1, 1], "layer_type": "basic"}
_DEFAULT_TEXT = {"model_type": "bert", "vocab_size": 8192, "hidden_size": 256, "num_hidden_layers": 4,
                 "num_attention_heads": 4, "intermediate_size": 1024, "max_position_embeddings": 77}


def training_objectives():
    """The training objectives' module (`objectives_lightclip`), or None where it is not installed: a folder saved
    for the Hub holds the inference code only, and the objectives come with the LightCLIP package."""
    name = f"{__package__}.objectives_lightclip"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:  # the module is there but something it imports is not: say so
            raise
        return None


def require_field(name: str, value, test, what: str) -> None:
    """One message naming the config field and its flag when `value` is not a finite number passing `test`."""
    try:
        ok = math.isfinite(float(value)) and test(value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} (--{name}): {what}.")


def require_choice(name: str, value, choices: tuple, flag: bool = False) -> None:
    if value not in choices:
        raise ValueError(f"{name}={value!r}{f' (--{name})' if flag else ''}: choose one of {choices}.")


def _as_sub_config(value, default: dict, name: str) -> PretrainedConfig:
    """Turn a config object, a dict carrying `model_type`, or None into a transformers config."""
    if value is None:
        value = dict(default)
        logger.info("`%s` is None; using the default %s tower.", name, default["model_type"])
    if isinstance(value, PretrainedConfig):
        return value
    if not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a transformers config or a dict with `model_type`, got {type(value)}")
    value = dict(value)
    model_type = value.pop("model_type", None)
    if model_type is None:
        raise ValueError(
            f"`{name}` has no `model_type`; add one, e.g. {{'model_type': '{default['model_type']}', ...}}."
        )
    try:
        return AutoConfig.for_model(model_type, **value)
    except ValueError as err:
        raise ValueError(
            f"Unknown {name.split('_')[0]} tower type {model_type!r}: it is not a transformers model type. "
            "Use one transformers knows (e.g. resnet, mobilenet_v2, efficientnet, vit, clip_vision_model for "
            "images; bert, clip_text_model for text)."
        ) from err


class LightCLIPConfig(PretrainedConfig):
    r"""
    Configuration of a [`LightCLIPModel`]: a lightweight dual encoder plus the multi-level training objectives of
    LightCLIP and the neighbour guidance of CLIP-PING.

    Defaults follow the measured study (docs/study.md): every extra objective is off, so a bare config is
    plain CLIP and trains on any batch; the soft-label fields default to the variant that measured best (similarity
    of the frozen encoders in the candidates' modality, alpha 0.3 from the start), so `soft_label_mode="similarity"` turns on
    the recommended objective. The `default` recipe does exactly that; `lightclip_paper` spells out the papers'
    configuration.

    Args:
        vision_config (`dict` or `PretrainedConfig`, *optional*):
            Image tower config. A dict must carry `model_type`. Defaults to a small ResNet.
        text_config (`dict` or `PretrainedConfig`, *optional*):
            Text tower config. A dict must carry `model_type`. Defaults to a 4-layer BERT.
        projection_dim (`int`, *optional*, defaults to 256):
            Size of the shared image-text embedding space.
        instance_loss (`str`, *optional*, defaults to `"softmax"`):
            The instance-level loss every recipe trains with: `"softmax"` (CLIP's symmetric InfoNCE over the global
            batch, which the soft labels reshape) or `"sigmoid"` (SigLIP's pairwise sigmoid loss with a learnable
            bias `logit_bias`, which the SigLIP paper found better than softmax at small batches). The soft labels
            redistribute a softmax's target mass and have no sigmoid reading: they are refused with it. Relation
            distillation, token alignment, MLM and CLIP-PING are their own terms and mean the same with either;
            cross-modal distillation takes the sigmoid form (targets from the teacher's sigmoid, which needs the
            teacher's bias).
        logit_scale_init_value (`float`, *optional*):
            Initial value of the learnable log temperature: CLIP's ln(1/0.07) for the softmax loss, SigLIP's ln 10
            for the sigmoid loss when not given.
        logit_bias_init_value (`float`, *optional*, defaults to -10):
            Initial value of the sigmoid loss's learnable bias (SigLIP's initialisation); unused with softmax.
        logit_scale_max (`float`, *optional*, defaults to ln(100)):
            The log temperature is clamped to this value after every optimiser step.
        image_size (`int`, *optional*):
            Input resolution the model is trained at; used to size token sequences. Defaults to the vision
            config's `image_size` or 224.
        vision_pooling (`str`, *optional*, defaults to `"auto"`):
            How the global image vector is taken: `"pooler"` (the tower's pooler output), `"cls"` (first token),
            `"mean"` (mean of the patch tokens). `"auto"` uses the pooler where the tower has one, else CLS for
            token sequences and mean for feature maps.
        text_pooling (`str`, *optional*, defaults to `"auto"`):
            How the global text vector is taken: `"eos"`/`"pooler"` (CLIP text tower's EOS token), `"cls"`
            (first token) or `"mean"` (attention-masked mean). `"auto"` is the pooler for CLIP text towers and the
            masked mean for BERT-style towers: a small text tower trained from scratch has no pre-trained CLS
            objective behind its first token, and the masked mean is what sentence encoders use.
        vision_token_stage (`int`, *optional*):
            Which feature map gives the image patch tokens for the token-level objective: `None` is the tower's
            last hidden state; an int indexes the tower's `hidden_states` (e.g. -2 for the stage before the last,
            useful for CNNs at small resolution, whose last map has few cells).
        cnn_init (`str`, *optional*, defaults to `"kaiming"`):
            Initialisation of convolutional towers built from a config (never of loaded weights): `"kaiming"`
            (Kaiming-normal convolutions, unit normalisation weights: the standard from-scratch init) or
            `"transformers"` (the backbone's own `_init_weights`; EfficientNet's draws BatchNorm weights from
            N(0, 0.02), which silences a fresh tower).
        token_projection_dim (`int`, *optional*, defaults to 128):
            Size of the shared token space of the token-level objective.
        soft_label_mode (`str`, *optional*, defaults to `"none"`):
            Progressive softened labels of the instance-level loss: `"none"` (one-hot), `"uniform"` (the
            softened mass spread evenly over the negatives) or `"similarity"` (spread over the negatives by their
            detached intra-modal similarity to the positive).
        soft_label_max (`float`, *optional*, defaults to 0.3):
            The softening weight alpha reached at the end of training.
        soft_label_schedule (`str`, *optional*, defaults to `"constant"`):
            How alpha rises from 0 to `soft_label_max` with training progress: `"linear"`, `"cosine"`, `"step"`
            (0 for the first half, then the maximum) or `"constant"`.
        soft_label_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the softmax over intra-modal similarities in `"similarity"` mode.
        soft_label_source (`str`, *optional*, defaults to `"frozen"`):
            Whose intra-modal similarity spreads the softened mass in `"similarity"` mode: `"student"` (the model's
            own detached embeddings, the LightCLIP paper's reading) or `"frozen"` (the frozen pretrained unimodal
            encoders of CLIP-PING, whose features the collator reads from `--teacher_features`: their
            neighbourhood structure is distilled into the student, and it is informative from the first step,
            whereas a student trained from scratch knows nothing early on).
        soft_label_modality (`str`, *optional*, defaults to `"candidates"`):
            Which intra-modal similarity spreads the mass in `"similarity"` mode: `"candidates"` (the candidates'
            modality: text-text for image->text rows, image-image for text->image rows) or `"both"` (the mean of the
            text-text and image-image similarities for both directions: a pair is a likely false negative when its
            captions *or* its images are alike) or `"text"` (the text-text similarity for both directions: captions
            are what a pair means, so image j is a likely false negative of caption i when caption j says the same;
            a sentence encoder judges that better than an ImageNet encoder judges pictures of another domain).
        token_loss_weight (`float`, *optional*, defaults to 0):
            Weight of the relaxed bipartite token alignment loss; 0 switches it off.
        token_match_threshold (`float`, *optional*):
            Cosine similarity below which a matched word-patch pair is dropped (partial matching); None keeps all.
        token_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of the token-level contrastive terms.
        token_negatives (`str`, *optional*, defaults to `"batch"`):
            Candidates a matched word (patch) must pick its patch (word) from: `"batch"` - every patch (word) of
            the global batch, so the term also says which image a word belongs to; `"image"` - the pair's own.
        token_objective (`str`, *optional*, defaults to `"word_patch"`):
            What the matching feeds: `"word_patch"` (each matched word must pick its patch among the candidates and
            vice versa, InfoNCE) or `"filip"` (a fine-grained score for every image-caption pair of the global batch,
            the mean similarity of its matched word-patch pairs, contrasted like the instance loss, as FILIP).
        token_matching (`str`, *optional*, defaults to `"hungarian"`):
            How `"filip"` matches words to patches: `"hungarian"` (exact one-to-one assignment per pair) or
            `"sinkhorn"` (its entropic LP relaxation, differentiable; the LP of bipartite matching is integral, so
            this is the natural smooth reading of "relaxed bipartite matching").
        token_solver (`str`, *optional*, defaults to `"auto"`):
            Assignment solver: `"scipy"` (Hungarian on CPU, one transfer per batch), `"batched"`
            (torch-linear-assignment, Triton on CUDA) or `"auto"` (batched on CUDA when installed, else scipy).
        mlm_loss_weight (`float`, *optional*, defaults to 0):
            Weight of the masked language modelling loss; 0 switches it off and the fusion module and MLM head
            are not built.
        mlm_probability (`float`, *optional*, defaults to 0.3):
            Share of caption words masked (80% [MASK], 10% random, 10% kept). With `mlm_batch_fraction` 0.25 this
            asks for as many predictions per step as BERT's 15% on half the rows, from half the masked rows.
        mlm_batch_fraction (`float`, *optional*, defaults to 0.25):
            Share of each batch's rows (the first ones; the sampler shuffles) whose masked caption goes through the
            fused MLM pass, as extra rows of the text-tower call: on a CPU the masked rows cost what they compute.
            0.25 rows at 30% masking scored as 0.5 rows at 15% on the selection split (3 seeds, every metric
            p >= 0.28; docs/study.md, "MLM rows") and brings the full LightCLIP CPU step from 1.21-1.22x to 1.13-1.15x of
            the CLIP step on the ResNet-18 and MobileNetV2 settings (1.23x where the text tower is half the step;
            benchmarks/objective_overhead.py). 1.0 runs MLM on every row.
        mlm_tie_head (`bool`, *optional*, defaults to `True`):
            Decode MLM predictions with the text tower's word-embedding matrix (BERT's tied head) or with a matrix of
            the MLM head's own (False), which keeps MLM's output-side gradient off the word embeddings.
        mlm_fusion (`bool`, *optional*, defaults to `True`):
            Inject the image's features into the masked pass (LightCLIP's fusion module); False is plain text MLM.
        mlm_start (`float`, *optional*, defaults to 0.0):
            Share of training after which MLM switches on (0: from the start). A delayed start lets the contrastive
            objective shape the text tower first.
        fusion_text_layers (`list[int]`, *optional*):
            Text encoder layers after which image features are injected by cross-attention. Defaults to the
            middle and the last layer.
        fusion_vision_stages (`list[int]`, *optional*):
            Image tower stages (indices into its `hidden_states`) whose features the fusion draws on, one per
            text layer in `fusion_text_layers`. Defaults to `[-2, -1]`.
        fusion_num_heads (`int`, *optional*, defaults to 4):
            Attention heads of the fusion cross-attention.
        save_training_modules (`bool`, *optional*, defaults to `True`):
            When False, `save_pretrained` leaves the training-only modules (fusion, MLM head, token projections)
            out of the saved weights and the saved config switches them off, giving a pure inference checkpoint.
        ping_nn_loss_weight, ping_xnn_loss_weight (`float`, *optional*, defaults to 0):
            Weights of CLIP-PING's nearest-neighbour and cross nearest-neighbour terms; 0 switches them off.
        ping_temperature (`float`, *optional*):
            Fixed temperature of the CLIP-PING terms; None uses the model's learned logit scale, as the instance
            loss does.
        relation_loss_weight (`float`, *optional*, defaults to 0):
            Weight of the frozen-relation distillation term: within each modality, the student's similarity
            distribution of every sample over the other samples of the global batch is pulled toward the frozen
            pretrained encoder's (KL, `relation_temperature` on both sides). It passes the frozen encoders' notion
            of which images / which captions are alike into each tower directly, rather than only through the
            contrastive targets. Needs the frozen encoders' features (`--teacher_features`). 0 switches it off.
        relation_temperature (`float`, *optional*, defaults to 0.1):
            Temperature of both similarity softmaxes of the relation term.
        distill_loss_weight (`float`, *optional*, defaults to 0):
            Weight of cross-modal distillation from multimodal (CLIP-like) teachers: KL between the teachers' and the
            student's image->text and text->image distributions over the global batch (CLIP-KD / MobileCLIP style).
            Needs training data reinforced with such a teacher (`lightclip-reinforce --teacher ...`). 0 switches it
            off.
        distill_temperature (`float`, *optional*, defaults to 1.0):
            Temperature dividing both sides' logits in the distillation term.
        distill_teacher_logit_scale (`float`, *optional*, defaults to 100.0):
            The scale the teachers' cosine similarities are multiplied by (a CLIP teacher's learned logit scale; set
            from the reinforced data's metadata when it records one; a different value given as a flag is then refused).
        distill_teacher_logit_bias (`float`, *optional*):
            The bias added to the teachers' scaled similarities by the sigmoid form of distillation (a SigLIP
            teacher's learned bias; set from the reinforced data's metadata when it records one). A softmax-trained
            (CLIP) teacher has none, and without one its sigmoid is no probability.
        distill_ensemble (`str`, *optional*, defaults to `"concatenate"`):
            How several multimodal teachers make one distillation target: `"concatenate"`, one softmax of their
            mean cosine similarity (their features concatenated, each scaled 1/sqrt(T)) at their mean logit scale;
            `"mean_probabilities"`, the mean of each teacher's own softmax at its own logit scale (MobileCLIP's
            ensemble). The same for one teacher. Softmax instance loss only.
        distill_teacher_dims, distill_teacher_logit_scales (`list`, *optional*):
            Each multimodal teacher's embedding size and logit scale, in the order the data stores them: set from
            the training data's teachers by the trainer.
        feature_distill_loss_weight (`float`, *optional*, defaults to 0):
            Weight of feature distillation (CLIP-KD's FD): each modality's embedding goes through a training-only
            linear projection into the teachers' feature space and, L2-normalised, is pulled toward the sample's
            teacher features (squared distance; several teachers: their concatenation, each scaled 1/sqrt(T)).
            Reads the teacher features every reinforced copy carries (any teacher, unimodal or multimodal). The
            projections never run at inference (left out of an inference-only save). 0 switches it off.
        feature_distill_teacher_dims (`list[int]`, *optional*):
            [image, text] dimensions of the teacher features feature distillation matches: set from the training
            data's teachers by the trainer.
        ping_negatives (`str`, *optional*, defaults to `"bank"`):
            What a CLIP-PING neighbour (a stale embedding from the memory bank) is contrasted with: `"bank"`, the
            other rows' neighbours from the same bank (equally stale); `"batch"`, the batch's current embeddings.
            `"batch"` lets the student lower the loss by drifting over time and collapsed training in the ablation
            (docs/study.md); it is kept for comparison only.
        ping_positives (`str`, *optional*, defaults to `"bank"`):
            Where a CLIP-PING neighbour's embedding comes from: `"bank"`, the memory bank of the student's own past
            embeddings (stale: written when the neighbour was last seen; `ping_negatives` says what it is contrasted
            with), or `"in_batch"`, fresh: a neighbour-aware sampler places each anchor's drawn neighbour in the same
            batch, so positive and negatives are all current embeddings of the global batch (no bank).
        ping_bank_size (`int`, *optional*, defaults to 0):
            Number of training samples the neighbour memory bank indexes (the dataset size); set by the trainer.
        mask_token_id, pad_token_id, cls_token_id, sep_token_id (`int`, *optional*):
            Token ids the MLM masking and the token-level objective need; taken from the tokenizer by the trainer.
    """

    model_type = "lightclip"
    sub_configs = {"vision_config": AutoConfig, "text_config": AutoConfig}
    # Fields that shape the weights: continuing from a checkpoint cannot change them.
    architecture_fields = ("projection_dim", "token_projection_dim", "image_size", "vision_token_stage",
                           "fusion_text_layers", "fusion_vision_stages", "fusion_num_heads", "mlm_tie_head",
                           "mlm_fusion")

    vision_config: dict | PretrainedConfig | None = None
    text_config: dict | PretrainedConfig | None = None
    projection_dim: int = 256
    instance_loss: str = "softmax"
    logit_scale_init_value: float | None = None
    logit_bias_init_value: float = -10.0
    logit_scale_max: float = math.log(100.0)
    image_size: int | None = None
    vision_pooling: str = "auto"
    text_pooling: str = "auto"
    vision_token_stage: int | None = None
    cnn_init: str = "kaiming"
    token_projection_dim: int = 128
    soft_label_mode: str = "none"
    soft_label_max: float = 0.3
    soft_label_schedule: str = "constant"
    soft_label_temperature: float = 0.1
    soft_label_source: str = "frozen"
    soft_label_modality: str = "candidates"
    token_loss_weight: float = 0.0
    token_match_threshold: float | None = None
    token_temperature: float = 0.1
    token_negatives: str = "batch"
    token_solver: str = "auto"
    token_objective: str = "word_patch"
    token_matching: str = "hungarian"
    mlm_loss_weight: float = 0.0
    mlm_probability: float = 0.3
    mlm_batch_fraction: float = 0.25
    mlm_tie_head: bool = True
    mlm_fusion: bool = True
    mlm_start: float = 0.0
    fusion_text_layers: list | None = None
    fusion_vision_stages: list | None = None
    fusion_num_heads: int = 4
    save_training_modules: bool = True
    ping_nn_loss_weight: float = 0.0
    ping_xnn_loss_weight: float = 0.0
    ping_bank_size: int = 0
    ping_temperature: float | None = None
    ping_negatives: str = "bank"
    ping_positives: str = "bank"
    relation_loss_weight: float = 0.0
    relation_temperature: float = 0.1
    distill_loss_weight: float = 0.0
    distill_temperature: float = 1.0
    distill_teacher_logit_scale: float = 100.0
    distill_teacher_logit_bias: float | None = None
    distill_ensemble: str = "concatenate"
    distill_teacher_dims: list | None = None
    distill_teacher_logit_scales: list | None = None
    feature_distill_loss_weight: float = 0.0
    feature_distill_teacher_dims: list | None = None
    mask_token_id: int | None = None
    cls_token_id: int | None = None
    sep_token_id: int | None = None

    def __post_init__(self, **kwargs):
        self.vision_config = _as_sub_config(self.vision_config, _DEFAULT_VISION, "vision_config")
        self.text_config = _as_sub_config(self.text_config, _DEFAULT_TEXT, "text_config")
        if self.logit_scale_init_value is None:
            self.logit_scale_init_value = DEFAULT_LOG_LOGIT_SCALE.get(self.instance_loss,
                                                                      DEFAULT_LOG_LOGIT_SCALE["softmax"])
        if self.image_size is None:
            self.image_size = getattr(self.vision_config, "image_size", None) or 224
        self.image_size = int(self.image_size)
        num_text_layers = getattr(self.text_config, "num_hidden_layers", 2)
        if self.fusion_text_layers is None:
            self.fusion_text_layers = sorted({max(num_text_layers // 2 - 1, 0), num_text_layers - 1})
        if self.fusion_vision_stages is None:
            self.fusion_vision_stages = [-2, -1][-len(self.fusion_text_layers):]
        self.fusion_text_layers = list(self.fusion_text_layers)
        self.fusion_vision_stages = list(self.fusion_vision_stages)
        for name in ("distill_teacher_dims", "distill_teacher_logit_scales", "feature_distill_teacher_dims"):
            setattr(self, name, list(getattr(self, name)) if getattr(self, name) else None)
        kwargs.setdefault("pad_token_id", getattr(self.text_config, "pad_token_id", None))
        super().__post_init__(**kwargs)
        self.validate_lightclip()

    # the fields of the model itself (towers, embedding space, pooling, special tokens); every other field belongs to
    # one objective's config group (`Objective.config_fields`)
    model_fields = ("vision_config", "text_config", "projection_dim", "instance_loss", "logit_scale_init_value",
                    "logit_scale_max", "image_size", "vision_pooling", "text_pooling", "cnn_init",
                    "save_training_modules", "mask_token_id", "cls_token_id", "sep_token_id")

    @classmethod
    def own_fields(cls) -> dict:
        """This class's own fields (not `PreTrainedConfig`'s): {name: dataclasses.Field}."""
        return {item.name: item for item in dataclasses.fields(cls) if item.name in cls.__annotations__}

    @classmethod
    def from_clip_config(cls, clip_config, **kwargs) -> "LightCLIPConfig":
        """The LightCLIP config of a transformers `CLIPConfig`: the same two tower configs, projection size and
        logit scale, the towers' own pooling (CLS after the vision tower's final norm, the text tower's EOS token);
        `kwargs` set any other field (objectives, special token ids)."""
        if getattr(clip_config, "model_type", None) != "clip":
            raise ValueError(f"from_clip_config takes a CLIPConfig, not {type(clip_config).__name__}.")
        fields = {"vision_config": clip_config.vision_config.to_dict(), "text_config": clip_config.text_config.to_dict(),
                  "projection_dim": clip_config.projection_dim,
                  "logit_scale_init_value": float(clip_config.logit_scale_init_value),
                  "image_size": clip_config.vision_config.image_size, "vision_pooling": "pooler",
                  "text_pooling": "pooler"}
        return cls(**{**fields, **kwargs})

    def validate_lightclip(self):
        """Check the fields alone and against each other; each failure names the field (the training script's flag
        of the same name) and the fix. Each objective checks its own fields (`Objective.validate`)."""
        # floors that keep every loss finite: similarities in [-1, 1] divided by a temperature, or multiplied by the
        # logit scale, stay far inside float16/bfloat16/float32 range (a denormal 1e-45 passes "> 0" but is 1/0)
        require_field("logit_scale_max", self.logit_scale_max, lambda v: 0 < v <= MAX_LOG_LOGIT_SCALE,
                      f"is the log of the largest logit scale: positive and at most {MAX_LOG_LOGIT_SCALE:.3f} = ln "
                      f"{1 / MIN_TEMPERATURE:g} (CLIP: ln 100 = 4.605)")
        require_field("logit_scale_init_value", self.logit_scale_init_value, lambda v: v <= self.logit_scale_max,
                      f"is the log of the initial logit scale: finite and at most logit_scale_max "
                      f"({self.logit_scale_max:g}) (CLIP: ln(1/0.07) = 2.659)")
        require_field("image_size", self.image_size, lambda v: v >= 1 and float(v).is_integer(),
                      "must be a positive number of pixels")
        patch = getattr(self.vision_config, "patch_size", None)
        if isinstance(patch, int) and self.image_size < patch:
            raise ValueError(f"image_size={self.image_size} (--image_size) is smaller than one {patch}-pixel patch of "
                             "the image tower.")
        require_choice("instance_loss", self.instance_loss, INSTANCE_LOSSES, flag=True)
        require_choice("text_pooling", self.text_pooling, TEXT_POOLING)
        require_choice("vision_pooling", self.vision_pooling, VISION_POOLING)
        if self.cnn_init not in ("kaiming", "transformers"):
            raise ValueError(f"cnn_init={self.cnn_init!r}: choose 'kaiming' or 'transformers'.")
        if self.projection_dim <= 0 or self.token_projection_dim <= 0:
            raise ValueError("projection_dim and token_projection_dim must be positive.")
        objectives = training_objectives()
        if objectives is not None:
            objectives.validate_config(self)

    @property
    def uses_sigmoid_loss(self) -> bool:
        """SigLIP's sigmoid instance loss (a learnable `logit_bias` beside the scale) instead of CLIP's softmax.
        Whether each training objective is on is the objective's own test (`Objective.enabled`)."""
        return self.instance_loss == "sigmoid"

    def loss_weights(self) -> dict[str, float]:
        """Weight of each enabled weighted term, by term name (the instance loss, weight 1, is not listed)."""
        objectives = training_objectives()
        return objectives.loss_weights(self) if objectives is not None else {}

    def special_token_ids(self) -> list[int]:
        """CLS/SEP/BOS/EOS/PAD/MASK ids of the text tower: never words, never masked for MLM. The one rule both the
        collator's masking and the model's word masks follow."""
        text = self.text_config
        ids = {self.cls_token_id, self.sep_token_id, self.pad_token_id, self.mask_token_id,
               getattr(text, "bos_token_id", None), getattr(text, "eos_token_id", None)}
        return sorted(i for i in ids if isinstance(i, int) and 0 <= i < text.vocab_size)

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["text_config"] = self.text_config.to_dict()
        return output


__all__ = ["LightCLIPConfig"]
