"""Train a LightCLIP model with the Hugging Face Trainer (stub: the trainer lands with its own issue)."""

import sys


def main(argv=None):
    raise SystemExit("train_lightclip.py: the training entry point is not implemented yet.")


if __name__ == "__main__":
    main(sys.argv[1:])
