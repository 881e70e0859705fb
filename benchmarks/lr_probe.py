"""A short learning-rate probe for an ablation arm: its towers' rate chosen on training loss, not on any split.

    python benchmarks/lr_probe.py --arm "lite0+minilm_scratch@128" --tower_learning_rates 5e-4 1e-4 \
        --steps 40 --json benchmarks/results/lr_probe_lite0_minilm_scratch.json

Each rate trains the arm (the CPU study's setting: data, tokenizer, batch, the projections at the setting's rate)
for `--steps` steps with `--vision_learning_rate` and `--text_learning_rate` set to it, the rates side by side at
the setting's threads per run. Prints the training loss every `--log_every` steps and the mean over the run
(`train_loss`); an arm whose loss stays at log(batch) has collapsed (every image embedding alike). Nothing is
evaluated.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ablation  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def probe(argv: list[str], out_dir: Path, threads: int | None) -> dict:
    with open(out_dir / "log.txt", "w") as log:
        code = subprocess.run([sys.executable, "train_lightclip.py", *argv], cwd=ROOT, env=ablation.run_env(threads),
                              stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"training failed (exit {code}), see {out_dir}/log.txt")
    state = json.loads((out_dir / "trainer_state.json").read_text())
    losses = {h["step"]: h["loss"] for h in state["log_history"] if "loss" in h}
    mean = next(h["train_loss"] for h in state["log_history"] if "train_loss" in h)
    return {"loss_by_step": losses, "train_loss": mean}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", required=True, choices=sorted(ablation.ARMS), metavar="ARM",
                        help="an arm of benchmarks/ablation.py")
    parser.add_argument("--tower_learning_rates", nargs="+", type=float, required=True)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--log_every", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/ablation", help="the study folder whose data is reused")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    setting = {**ablation.SETTINGS["cpu"], "max_steps": args.steps}
    data_dir = ROOT / args.out / "data"
    files = ablation.prepare_data(data_dir, None, None)
    tokenizer = ablation.setting_tokenizer(data_dir, files, setting)
    arm = ablation.ARMS[args.arm]
    neighbours = (ablation.prepare_neighbours(data_dir, files["train"], setting["image_size"])
                  if ablation.needs_teacher_knowledge(ablation.arm_config(setting, arm)) else None)
    work = Path(tempfile.mkdtemp(prefix="lr_probe_"))

    def _one(rate: float) -> dict:
        out_dir = work / f"lr{rate:g}"
        out_dir.mkdir()
        overrides = {**arm, "vision_learning_rate": rate, "text_learning_rate": rate}
        flags = ablation.train_argv(setting, overrides, args.seed, files, tokenizer, neighbours, out_dir)
        flags += ["--logging_steps", str(args.log_every)]  # after train_argv's own: the last one counts
        return probe(flags, out_dir, setting["threads"])

    with ThreadPoolExecutor(max_workers=len(args.tower_learning_rates)) as pool:
        results = dict(zip(args.tower_learning_rates, pool.map(_one, args.tower_learning_rates)))
    shutil.rmtree(work)  # the probes' saved models (a failed probe's folder stays, for its log)
    for rate, result in results.items():
        curve = " ".join(f"{loss:.3f}" for loss in result["loss_by_step"].values())
        print(f"towers at {rate:g}: mean training loss {result['train_loss']:.3f}; every {args.log_every} steps: "
              f"{curve}")
    if args.json:
        from results_file import write_results

        write_results(args.json, {"arm": args.arm, "steps": args.steps, "seed": args.seed,
                                  "batch_size": setting["batch_size"],
                                  "results": {f"{r:g}": v for r, v in results.items()}})


if __name__ == "__main__":
    main()
