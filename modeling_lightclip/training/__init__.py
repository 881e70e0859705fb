"""The training side of LightCLIP: everything `train_lightclip.py` needs beyond the remote-code set.

Never imported by the remote-code files (`configuration_lightclip`, `modeling_lightclip`, `objectives_lightclip`,
`processing_lightclip`), so a saved model runs with torch + transformers alone. One module per concept:

* `arguments` - command-line flags (every `LightCLIPConfig` field is one) and contrastive `TrainingArguments`
* `recipes` - named recipes in `configuration/` -> `LightCLIPConfig`
* `preprocessing` - the tokenizer (trained on the captions or given) and the image processor
* `build` - the one set-up path: config, CLIP-PING, model, processor, LoRA
* `data` - dataset loading, augmentation, the collator that skips and counts bad samples
* `neighbours` - CLIP-PING's frozen-encoder features and nearest-neighbour tables
* `trainer` - `LightCLIPTrainer`, its callback, checkpoints
* `evaluation` + `metrics/` - zero-shot accuracy and retrieval recall (local `evaluate` modules)
* `hub` - model card, push, native `CLIPModel` export
* `lora` - LoRA fine-tuning with peft, merged on save
* `offline_data` - Fashion-MNIST and OpenClipart from Debian's packages
"""
