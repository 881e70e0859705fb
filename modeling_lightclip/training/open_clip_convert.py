"""An OpenCLIP checkpoint whose towers map onto transformers' CLIP -> a `CLIPModel` folder with its processor.

    python -m modeling_lightclip.training.open_clip_convert ViT-B-32:laion2b_s34b_b79k --out clip-b32-laion
    python -m modeling_lightclip.training.open_clip_convert local-dir:PATH --out DIR     # or hf-hub:ORG/NAME
    python train_lightclip.py --model_name_or_path DIR ...                               # a start for fine-tuning
    lightclip-reinforce --teacher DIR ...                                                # or a teacher

What maps: OpenCLIP's `CLIP` with a ViT image tower (class-token pooling, pre- and post-LayerNorm, no layer scale,
no attentional pooler) and its standard text transformer (causal, argmax pooling, OpenAI's BPE tokenizer), GELU or
QuickGELU. The weights are copied one for one (the fused attention projection split into query, key and value);
the image processor takes OpenCLIP's image size, mean and std; the tokenizer is OpenAI CLIP's BPE vocabulary as
OpenCLIP ships it. Anything else (ResNet or timm image towers, Hugging Face text towers, SigLIP, CoCa, custom
attention blocks) is refused with what does not map. After writing, the two models' image and text embeddings and
logits are compared on random inputs (`--check`, on by default).
"""

import argparse
import json
from pathlib import Path

import torch


def open_clip_source(name: str, prefix: str = "") -> tuple[str, str | None]:
    """(model name, weights tag) for OpenCLIP's loaders from NAME: `MODEL:TAG` (a built-in architecture and its
    weights tag), `hf-hub:ORG/NAME`, or `local-dir:PATH` (a folder with `open_clip_config.json` and the weights, as
    OpenCLIP pushes models to the Hub). A built-in architecture without a tag and a folder that is not an OpenCLIP
    model are refused: either would load randomly initialised weights. `prefix`: what precedes NAME where the user
    wrote it (`open_clip:` in a teacher spec), for the suggestion."""
    if name.startswith(("hf-hub:", "local-dir:")):
        folder = Path(name[len("local-dir:"):]).expanduser() if name.startswith("local-dir:") else None
        if folder is not None and not (folder / "open_clip_config.json").is_file():
            raise ValueError(f"{folder} has no open_clip_config.json (an OpenCLIP model folder holds it and the "
                             "weights, open_clip_model.safetensors or open_clip_pytorch_model.bin).")
        if folder is not None and not any(any(folder.glob(p)) for p in ("*.safetensors", "*.bin", "*.pth")):
            raise ValueError(f"{folder} has no weights (open_clip_model.safetensors or open_clip_pytorch_model.bin): "
                             "the model would be randomly initialised.")
        return name, None
    model_name, _, pretrained = name.partition(":")
    if not pretrained:
        raise ValueError(f"name the weights too, {prefix}{model_name}:TAG (the tags open_clip.list_pretrained() lists "
                         f"for {model_name}); without them the model would be randomly initialised.")
    return model_name, pretrained


def _model_config(open_clip, name: str) -> dict:
    from open_clip.factory import get_model_config

    config = get_model_config(name)
    if config is None:
        raise ValueError(f"{name}: OpenCLIP knows no such model (open_clip.list_models() lists the built-in ones; a "
                         "folder is local-dir:PATH, a Hub repo hf-hub:ORG/NAME).")
    return config


def unmappable(config: dict) -> list[str]:
    """What in an OpenCLIP model config has no counterpart in transformers' CLIP (empty: it maps)."""
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    problems = []
    if vision.get("timm_model_name") or not isinstance(vision.get("layers", 12), int):
        problems.append("the image tower is not a ViT (a ResNet or a timm model)")
    if text.get("hf_model_name"):
        problems.append(f"the text tower is a Hugging Face {text['hf_model_name']} model")
    if config.get("init_logit_bias") is not None:
        problems.append("a sigmoid (SigLIP) model with a logit bias, which CLIPModel has not")
    if "multimodal_cfg" in config:
        problems.append("a CoCa model (a captioning decoder)")
    for side, cfg, defaults in (("image", vision, {"ls_init_value": None, "attentional_pool": False,
                                                   "no_ln_pre": False, "pos_embed_type": "learnable",
                                                   "final_ln_after_pool": False, "pool_type": "tok"}),
                                ("text", text, {"ls_init_value": None, "embed_cls": False, "no_causal_mask": False,
                                                "final_ln_after_pool": False, "pool_type": "argmax",
                                                "proj_bias": False, "proj_type": "linear", "tokenizer_mode": None,
                                                "hf_tokenizer_name": None})):
        for key, default in defaults.items():
            if cfg.get(key, default) != default:
                problems.append(f"{side} tower {key}={cfg[key]!r}")
        for key in ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc"):
            if cfg.get(key):
                problems.append(f"{side} tower {key}")
        if cfg.get("block_type") not in (None, "default"):
            problems.append(f"{side} tower block_type={cfg['block_type']!r}")
    if text.get("vocab_size", 49408) != 49408:
        problems.append(f"a text vocabulary of {text['vocab_size']} tokens (not OpenAI CLIP's BPE)")
    return problems


def clip_config(config: dict):
    """The `CLIPConfig` of a mappable OpenCLIP model config."""
    from transformers import CLIPConfig

    vision, text = config["vision_cfg"], config["text_cfg"]
    act = "quick_gelu" if config.get("quick_gelu") else "gelu"
    width, text_width = vision.get("width", 768), text.get("width", 512)
    return CLIPConfig(
        projection_dim=config["embed_dim"],
        vision_config={"hidden_size": width, "intermediate_size": int(width * vision.get("mlp_ratio", 4.0)),
                       "num_hidden_layers": vision.get("layers", 12),
                       "num_attention_heads": width // vision.get("head_width", 64),
                       "image_size": vision.get("image_size", 224), "patch_size": vision.get("patch_size", 16),
                       "hidden_act": act, "layer_norm_eps": 1e-5},
        text_config={"hidden_size": text_width, "intermediate_size": int(text_width * text.get("mlp_ratio", 4.0)),
                     "num_hidden_layers": text.get("layers", 12), "num_attention_heads": text.get("heads", 8),
                     "max_position_embeddings": text.get("context_length", 77), "vocab_size": 49408,
                     "hidden_act": act, "layer_norm_eps": 1e-5, "bos_token_id": 49406, "eos_token_id": 49407,
                     "pad_token_id": 49407})


def _blocks(state: dict, source: str, target: str, layers: int) -> dict:
    out = {}
    for i in range(layers):
        s, t = f"{source}.{i}.", f"{target}.{i}."
        q, k, v = state[s + "attn.in_proj_weight"].chunk(3)
        qb, kb, vb = state[s + "attn.in_proj_bias"].chunk(3)
        out.update({t + "self_attn.q_proj.weight": q, t + "self_attn.k_proj.weight": k, t + "self_attn.v_proj.weight": v,
                    t + "self_attn.q_proj.bias": qb, t + "self_attn.k_proj.bias": kb, t + "self_attn.v_proj.bias": vb,
                    t + "self_attn.out_proj.weight": state[s + "attn.out_proj.weight"],
                    t + "self_attn.out_proj.bias": state[s + "attn.out_proj.bias"],
                    t + "layer_norm1.weight": state[s + "ln_1.weight"], t + "layer_norm1.bias": state[s + "ln_1.bias"],
                    t + "layer_norm2.weight": state[s + "ln_2.weight"], t + "layer_norm2.bias": state[s + "ln_2.bias"],
                    t + "mlp.fc1.weight": state[s + "mlp.c_fc.weight"], t + "mlp.fc1.bias": state[s + "mlp.c_fc.bias"],
                    t + "mlp.fc2.weight": state[s + "mlp.c_proj.weight"], t + "mlp.fc2.bias": state[s + "mlp.c_proj.bias"]})
    return out


def clip_state_dict(state: dict, config) -> dict:
    """OpenCLIP `CLIP` weights under transformers' `CLIPModel` names."""
    state = {(k[len("text."):] if k.startswith("text.") else k): v for k, v in state.items()}  # CustomTextCLIP
    vision_layers, text_layers = config.vision_config.num_hidden_layers, config.text_config.num_hidden_layers
    out = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": state["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": state["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": state["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": state["visual.ln_post.bias"],
        "visual_projection.weight": state["visual.proj"].t(),
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_model.final_layer_norm.weight": state["ln_final.weight"],
        "text_model.final_layer_norm.bias": state["ln_final.bias"],
        "text_projection.weight": state["text_projection"].t(),
        "logit_scale": state["logit_scale"].reshape(()),
    }
    out.update(_blocks(state, "visual.transformer.resblocks", "vision_model.encoder.layers", vision_layers))
    out.update(_blocks(state, "transformer.resblocks", "text_model.encoder.layers", text_layers))
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def clip_processor(open_clip_model):
    """A `CLIPProcessor`: OpenCLIP's image size, mean and std; OpenAI CLIP's BPE vocabulary as OpenCLIP ships it."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer

    bpe = SimpleTokenizer()
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    size = open_clip_model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    cfg = getattr(open_clip_model.visual, "preprocess_cfg", {}) or {}
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # OpenAI's (and HF's) names
    vocab = {renamed.get(token, token): index for token, index in bpe.encoder.items()}
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[tuple(m) for m in merges],
                              model_max_length=open_clip_model.context_length)
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                         image_mean=list(cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))),
                                         image_std=list(cfg.get("std", (0.26862954, 0.26130258, 0.27577711))))
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def convert(name: str, out: str | Path, pretrained: str | None = None, check: bool = True) -> dict:
    """Convert the OpenCLIP model `name` (`MODEL` with `pretrained` a weights tag, `hf-hub:ORG/NAME` or
    `local-dir:PATH`) into a `CLIPModel` folder at `out`; returns the check's largest differences."""
    try:
        import open_clip
    except ImportError:
        raise ValueError("converting an OpenCLIP checkpoint needs open_clip_torch: pip install 'lightclip[openclip]'") \
            from None
    from transformers import CLIPModel

    config = _model_config(open_clip, name)
    problems = unmappable(config)
    if problems:
        raise ValueError(f"{name}: this OpenCLIP architecture does not map onto transformers' CLIPModel ("
                         + "; ".join(problems) + "). Use it as a teacher instead: lightclip-reinforce --teacher "
                         f"open_clip:{name}{':' + pretrained if pretrained else ''}.")
    source = open_clip.create_model(name, pretrained=pretrained).eval()
    hf_config = clip_config(config)
    model = CLIPModel(hf_config).eval()
    missing, unexpected = model.load_state_dict(clip_state_dict(source.state_dict(), hf_config), strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{name}: weights that did not map (missing {missing[:5]}, unexpected {unexpected[:5]}).")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    clip_processor(source).save_pretrained(out)
    (out / "converted_from.json").write_text(json.dumps({"open_clip_model": name, "pretrained": pretrained}))
    return compare(source, model, hf_config) if check else {}


@torch.no_grad()
def compare(source, model, config, batch: int = 3, seed: int = 0) -> dict:
    """Largest absolute differences of image / text embeddings and logits on random pixels and token ids."""
    generator = torch.Generator().manual_seed(seed)
    size = config.vision_config.image_size
    pixels = torch.randn(batch, 3, size, size, generator=generator)
    context = config.text_config.max_position_embeddings  # OpenCLIP's text tower takes exactly this many tokens
    ids = torch.zeros(batch, context, dtype=torch.long)  # padded with 0 after the end token, as OpenCLIP pads
    for row in range(batch):
        length = int(torch.randint(2, context - 1, (1,), generator=generator))
        ids[row, 1:length] = torch.randint(1, 49405, (length - 1,), generator=generator)
        ids[row, 0], ids[row, length] = 49406, 49407
    image_a, text_a = source.encode_image(pixels), source.encode_text(ids)
    image_b = model.get_image_features(pixel_values=pixels).pooler_output
    text_b = model.get_text_features(input_ids=ids).pooler_output
    logits_a = source.logit_scale.exp() * torch.nn.functional.normalize(image_a, dim=-1) @ \
        torch.nn.functional.normalize(text_a, dim=-1).t()
    logits_b = model(input_ids=ids, pixel_values=pixels).logits_per_image
    return {"image_embeds": float((image_a - image_b).abs().max()), "text_embeds": float((text_a - text_b).abs().max()),
            "logits": float((logits_a - logits_b).abs().max())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="MODEL:TAG (built-in architecture and weights tag), hf-hub:ORG/NAME or "
                                      "local-dir:PATH")
    parser.add_argument("--out", required=True, help="the CLIPModel folder to write")
    parser.add_argument("--no_check", action="store_true", help="skip comparing the two models' outputs")
    args = parser.parse_args(argv)
    try:
        name, pretrained = open_clip_source(args.model)
    except ValueError as err:
        parser.error(f"{args.model}: {err}")
    try:
        differences = convert(name, args.out, pretrained, check=not args.no_check)
    except ValueError as err:
        parser.exit(2, f"error: {err}\n")
    if differences:
        print("largest differences OpenCLIP vs CLIPModel: " + ", ".join(f"{k} {v:.2e}" for k, v in differences.items()))
        if differences["logits"] > 1e-3:
            parser.exit(1, "error: the converted model does not reproduce the OpenCLIP model's logits.\n")
    print(f"wrote {args.out}")
    return 0


__all__ = ["clip_config", "clip_state_dict", "compare", "convert", "open_clip_source", "unmappable"]


if __name__ == "__main__":
    raise SystemExit(main())
