"""samv2-train: train, resume, or export an embedding model.

    samv2-train --config run.yaml            start a run (run dir = run.output_dir/run.name)
    samv2-train --resume RUN_DIR             continue from the newest valid checkpoint
    samv2-train --resume RUN_DIR --config run.yaml   same, but refuse if run.yaml differs
    samv2-train --resume RUN_DIR --restart   start again from step 0 if no checkpoint is valid
    samv2-train --export RUN_DIR --out model.safetensors [--which best|last]
    samv2-train --check-config run.yaml      validate the config and the data, then exit

With ``crosssam: {enabled: true, pairs: [...]}`` the run is the CrossSAM register-then-learn
loop (samv2train.crosssam) instead of plain SAM / Semantic-SAM training.

Multi-GPU / multi-node: ``torchrun --nproc_per_node N -m samv2train.cli --config run.yaml``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from samv2core.errors import InputError, OneLineParser, run_cli

from .config import load_config
from .crosssam import run_crosssam
from .data import load_dataset
from .export import export_run
from .trainer import train


def main(argv=None) -> int:
    ap = OneLineParser(prog="samv2-train", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--config", help="run config (.yaml/.json/.toml)")
    ap.add_argument("--resume", metavar="RUN_DIR", help="resume the run in RUN_DIR")
    ap.add_argument("--restart", action="store_true",
                    help="with --resume: start the run again from step 0 when none of its checkpoints is valid")
    ap.add_argument("--iterations", type=int, help="override run.iterations (e.g. to extend a resumed run)")
    ap.add_argument("--threads", type=int, help="override runtime.num_threads")
    ap.add_argument("--export", metavar="RUN_DIR", help="export a run's weights with samv2core.model_io")
    ap.add_argument("--out", help="output .safetensors path for --export")
    ap.add_argument("--which", choices=("best", "last"), default="best")
    ap.add_argument("--check-config", metavar="CONFIG", help="validate a config and its data, then exit")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    args = ap.parse_args(argv)
    return run_cli("samv2-train", lambda: _run(args, ap), "interrupted (resume with --resume RUN_DIR)")


def _run(args, ap) -> int:
    if args.check_config:
        cfg = load_config(args.check_config)
        load_dataset(cfg.data, log=lambda m: print(m, file=sys.stderr))
        print(f"config OK: {args.check_config} (identity {cfg.identity_hash()}, run dir {cfg.run_dir})")
        return 0
    if args.export:
        if not args.out:
            ap.error("--export needs --out PATH.safetensors")

        path = export_run(Path(args.export), Path(args.out), which=args.which)
        print(f"exported {path}")
        return 0
    if args.restart and not args.resume:
        ap.error("--restart goes with --resume RUN_DIR")
    if not args.config and not args.resume:
        ap.error("give --config FILE to start a run or --resume RUN_DIR to continue one")

    if args.resume:
        run_dir = Path(args.resume)
        saved = run_dir / "config.yaml"
        if not saved.is_file():
            raise InputError(f"{run_dir}: not a run directory (no config.yaml)")
        cfg = load_config(saved)
        if args.config:
            other = load_config(args.config)
            if other.identity_hash() != cfg.identity_hash():
                raise InputError(f"{run_dir}: was created by a different config than {args.config} "
                                 f"({cfg.identity_hash()} != {other.identity_hash()}); refusing to resume")
        # the run may have been moved: the run dir given on the command line wins
        cfg.run.output_dir = str(run_dir.resolve().parent)
        cfg.run.name = run_dir.resolve().name
    else:
        cfg = load_config(args.config)
    if args.iterations:
        cfg.run.iterations = args.iterations
    if args.threads:
        cfg.runtime.num_threads = args.threads
    if args.no_progress:
        cfg.runtime.progress = False
    if cfg.crosssam.enabled:
        trainer = run_crosssam(cfg, resume=bool(args.resume), restart=args.restart)
    else:
        trainer = train(cfg, resume=bool(args.resume), restart=args.restart)
    st = trainer.state
    if trainer.dist.is_main:
        best = (f"best validation {st.best_metric:.2f} mm at step {st.best_step}" if st.best_step >= 0
                else "no validation run")
        print(f"done: step {st.step}/{cfg.run.iterations}, {best}; run dir {trainer.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
