"""train_lightclip.main with a short sleep after every step, so a test can kill it mid-training."""

import sys
import time

from transformers import TrainerCallback

import modeling_lightclip.training.trainer as trainer_module
import train_lightclip


class _Slow(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.5)


_original_init = trainer_module.LightCLIPTrainer.__init__


def _init(self, *args, callbacks=None, **kwargs):
    _original_init(self, *args, callbacks=list(callbacks or []) + [_Slow()], **kwargs)


trainer_module.LightCLIPTrainer.__init__ = _init
train_lightclip.LightCLIPTrainer.__init__ = _init

if __name__ == "__main__":
    train_lightclip.main(sys.argv[1:])
