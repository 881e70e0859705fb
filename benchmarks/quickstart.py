"""The quickstart's figures: `make train`'s training command on a fresh output folder, timed, with its results.

    python benchmarks/quickstart.py --json benchmarks/results/quickstart_cpu.json

Runs `python train_lightclip.py` (the embedded default: the recommended objective, the frozen encoders' features
built on first use) into an empty output folder, as `make train` does after set-up, and records the wall clock of
the whole command and the evaluation it wrote (`eval_results.json`).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", required=True)
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags added to the training command")
    args = parser.parse_args(argv)

    from results_file import write_results

    with tempfile.TemporaryDirectory(prefix="lightclip-quickstart-") as scratch:  # removed when the run ends
        out = Path(scratch) / "run"
        command = [sys.executable, "train_lightclip.py", "--output_dir", str(out), *args.extra]
        started = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
        wall = time.perf_counter() - started
        evaluation = json.loads((out / "eval_results.json").read_text())
        training = json.loads((out / "train_results.json").read_text())
        info = json.loads((out / "training_info.json").read_text())
    result = {"training_command": "python train_lightclip.py" + "".join(f" {a}" for a in args.extra),
              "wall_seconds": wall, "train_runtime_seconds": training["train_runtime"],
              "train_samples": info["train_samples"], "eval": evaluation}
    write_results(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "eval"}, indent=2))
    print({k: round(v, 4) for k, v in evaluation.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
