"""The training side of LightCLIP: everything `train_lightclip.py` needs beyond the remote-code set.

Never imported by the remote-code files (`configuration_lightclip`, `modeling_lightclip`, `processing_lightclip`),
so a saved model runs with torch + transformers alone; the training objectives (`objectives_lightclip`) sit beside
them in the package but are not saved with a model either. One module per concept:

* `arguments` - command-line flags (every `LightCLIPConfig` field is one) and contrastive `TrainingArguments`
* `recipes` - named recipes in `configuration/` -> `LightCLIPConfig`
* `preprocessing` - the tokenizer (trained on the captions or given) and the image processor
* `packaged_weights` - pretrained towers whose weights install from pip; checks of saved folders
* `build` - the one set-up path: config, teacher features, model, processor, LoRA
* `tables` - csv / tsv / json(-lines) files read row by row, bad rows skipped and counted
* `data` - dataset loading, augmentation (and stored views), the collator that skips and counts bad samples
* `reinforce` + `reinforced_copy` - `lightclip-reinforce`: teacher features (and views, synthetic captions) stored
  with every sample, and the copy's format
* `teacher_features` - the one path of teacher features from the data to the objectives: every run with teachers
  trains on a reinforced copy (given, written by `--teacher_features auto`, or converted from a `neighbours` folder)
* `neighbours` - frozen-encoder features and nearest-neighbour tables (CLIP-PING's neighbours, the study's folders)
* `locked_outputs` - a locked text tower's outputs stored with each training row
* `accumulation` - contrastive gradient accumulation (a batch larger than memory trained as one batch)
* `processes` - accelerate's view of the launch's processes and of the wrapped model
* `trainer` - `LightCLIPTrainer` and its callback
* `checkpoints` - whether a checkpoint is whole, which one `latest` means, the CLIP-PING bank beside it
* `optimizer_groups` - weight decay on matrices only, each tower at its learning rate
* `stops` - `TrainingStopped`, and a full disk turned into one message
* `evaluation` + `metrics/` - zero-shot accuracy and retrieval recall (local `evaluate` modules)
* `benchmark` + `clip_benchmark_model` - `lightclip-eval` on clip_benchmark-format sets, and the model inside
  clip_benchmark
* `hub` - model card, push, native `CLIPModel` export
* `onnx_export` - ONNX export of both encoders
* `open_clip_convert` - an OpenCLIP checkpoint -> a transformers `CLIPModel` folder
* `lora` - LoRA fine-tuning with peft, merged on save
* `provenance` - versions, commit, date and hardware, stamped into cards and reinforced copies

The study's data preparation and results files live in `benchmarks/` (`offline_data.py`, `results_file.py`).
"""
