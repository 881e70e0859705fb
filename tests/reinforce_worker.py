"""Run by tests/test_reinforce.py under `torchrun --nproc_per_node 2` (gloo, CPU).

`reinforce CSV OUT [FLAG ...]`: each process writes its own shards of the reinforced copy (extra flags are
lightclip-reinforce's, after the defaults here).
`train COPY RUN RECORD [FLAG ...]`: train the default recipe from the copy, streamed, and record (per rank, in
RECORD-rank{r}.txt) the caption of every sample each optimiser step trained on, decoded from the batch the model
received (extra flags are the trainer's, after the defaults here).
"""

import faulthandler
import os
import sys
from pathlib import Path


def main() -> None:
    faulthandler.dump_traceback_later(300, exit=True)  # a hang shows its stacks and fails instead of blocking CI
    command = sys.argv[1]
    if command == "reinforce":
        from modeling_lightclip.training.reinforce import main as reinforce

        csv, out = sys.argv[2:4]
        code = reinforce(["--train_file", csv, "--out", out, "--shard_size", "25", "--teacher_image_size", "64",
                          "--batch_size", "16", *sys.argv[4:]])
        raise SystemExit(code)
    copy, run, record = sys.argv[2:5]
    import train_lightclip
    from modeling_lightclip.training.trainer import LightCLIPTrainer

    rank = int(os.environ.get("RANK", "0"))
    seen = []
    original = LightCLIPTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        if model.training and "input_ids" in inputs:
            tokenizer = self.processing_class.tokenizer
            seen.extend(tokenizer.batch_decode(inputs["input_ids"], skip_special_tokens=True))
        return original(self, model, inputs, *args, **kwargs)

    LightCLIPTrainer.compute_loss = recording
    train_lightclip.main(["--train_file", copy, "--streaming", "--max_steps", "25", "--per_device_train_batch_size",
                          "4", "--image_size", "32", "--dataloader_num_workers", "0", "--do_eval", "false",
                          "--logging_steps", "5", "--output_dir", run, *sys.argv[5:]])
    Path(f"{record}-rank{rank}.txt").write_text("\n".join(seen) + "\n")
    from modeling_lightclip.training.processes import end_processes

    end_processes()


if __name__ == "__main__":
    main()
