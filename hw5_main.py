"""The report's experiment (Section 4): HW5Net trained with CIoU and with MSE, compared.

    python hw5_main.py --data_dir DATA --out_dir runs/hw5     # on a dataset built by Dataset.py
    python hw5_main.py --demo --out_dir runs/demo              # no COCO: synthetic data (docs/demo.md)
    python hw5_main.py --out_dir OUT --check                   # a TA's read-only check of OUT

Trains both models (train.py), evaluates the best of each on the training and test
splits, and writes into OUT each model's run (ciou/, mse/) with its predictions, the
figures of the report's Figs. 14-20, model_sum.txt, results.json and results.md.
"""
import argparse
import logging
import os
import platform
import sys
import time

import torch

from checkpoints import RunFiles, load_checkpoint, load_model_state
from cli import HelpFormatter, Sigterm, UserError, command, out_dir_problem
from Dataset import build_dataset, load_splits
from devices import DeviceBatches, pick_device, usable_cpus
from network import build_model, count_parameters, model_summary
from outputs import held_lock, read_json, write_json, write_text
from grading import check, check_summary
from results import (EXPERIMENT_SETTINGS, MODELS, REPORT, aggregate_results, aggregate_seed_folders, compare_models,
                     draw_figures, holds_an_experiment, keep_earlier_wall_seconds, redraw, results_markdown,
                     seed_runs)
from synthetic.coco import make_synthetic_coco
from train import (add_training_args, check_training_args, make_criteria, run_settings,
                   seed_everything, train)
from utils import coco_ground_truth, coco_metrics, coco_results, evaluation, mean_box_baseline, prediction_records

log = logging.getLogger("hw5_main")

# The demo: a synthetic tree small enough for 2 CPU cores. An option left unset takes the
# demo's value with --demo and the report's without. Why these: docs/demo.md.
DEMO_DATA = {"n_train": 720, "n_val": 200, "synthetic_seed": 0}
DEMO_TRAINING = {"epochs": 8, "single_backward": True, "lr_schedule": "cosine", "warmup_epochs": 1}
DEMO = {**DEMO_DATA, **DEMO_TRAINING}


def prepare_demo_data(out_dir, drawn, progress=True):
    """The synthetic COCO tree drawn with drawn ({"n_train", "n_val", "synthetic_seed"}) and
    built into OUT/data, once: a resumed demo, or a seed's task that finds another drawing
    it (it waits), reuses it if it was drawn the same."""
    os.makedirs(out_dir, exist_ok=True)
    with held_lock(os.path.join(out_dir, ".demo_data.lock"), wait=True):
        return draw_demo_data(out_dir, drawn, progress)


def draw_demo_data(out_dir, drawn, progress):
    data_dir = os.path.join(out_dir, "data")
    record = os.path.join(out_dir, "demo_data.json")
    if os.path.exists(record):
        was = read_json(record, "what the demo's data was drawn with")
        changed = [f"--{k} {was[k]} (now {v})" for k, v in drawn.items() if was[k] != v]
        if changed:
            raise UserError(f"{data_dir} was drawn with " + ", ".join(changed) + "; give the same "
                            "options to go on with it, or choose another --out_dir")
        log.info("demo: reusing the dataset in %s", data_dir)
        return data_dir
    coco_dir = os.path.join(out_dir, "synthetic_coco")
    make_synthetic_coco(coco_dir, drawn["n_train"], drawn["n_val"], drawn["synthetic_seed"], year=2014)
    build_dataset(coco_dir, data_dir, year=2014, workers=usable_cpus(), progress=progress)
    write_json(drawn, record)  # last: the data is complete
    return data_dir


def run_model(key, loss_name, datasets, out_dir, args, device):
    """Train the `key` model into OUT/key, reload its best state and evaluate it on every
    split: metrics, OUT/key/predictions_{split}.json and coco_results_{split}.json, COCO's
    metrics. Returns (results per split, history, prediction records per split)."""
    train_set, test_set, val_set = datasets
    run_dir = os.path.join(out_dir, key)
    args = argparse.Namespace(**{**vars(args), "loss": key})
    seed_everything(args.seed)  # both models start from the same seeded weights
    model, history = train(build_model(args), train_set, test_set, run_dir, args, device, val_set,
                           progress=not args.quiet)
    Sigterm.stop_here(f"after training the {loss_name} model")
    best = RunFiles(run_dir).best
    load_model_state(model, load_checkpoint(best), best)
    criterion_cls, criterion_box, _ = make_criteria(key)
    splits = {"train": train_set, "test": test_set, **({"val": val_set} if val_set else {})}
    log.info("%s model: evaluating its best epoch (%s) on %s", loss_name, history["best_epoch"],
             ", ".join(splits))
    results, records = {}, {}
    for split, data in splits.items():
        cm, res = evaluation(model, DeviceBatches(data, args.eval_batch_size, device), criterion_cls,
                             criterion_box, device, order=not args.raw_boxes, amp=args.amp)
        records[split] = prediction_records(data.files, data.data, res.pop("predictions"))
        detections = coco_results(records[split], data.data)
        write_json(records[split], os.path.join(run_dir, f"predictions_{split}.json"))
        write_json(detections, os.path.join(run_dir, f"coco_results_{split}.json"))
        results[split] = {**res, "confusion_matrix": cm.tolist(),
                          "coco": coco_metrics(coco_ground_truth(data.files, data.data), detections)}
    log.info("%s model (best epoch %s): train accuracy %.3f mIoU %.3f | test accuracy %.3f mIoU %.3f",
             loss_name, history["best_epoch"], results["train"]["accuracy"],
             results["train"]["mean_iou"], results["test"]["accuracy"], results["test"]["mean_iou"])
    Sigterm.stop_here(f"after evaluating the {loss_name} model")
    return results, history, records


def run_experiment(args, out_dir, datasets, device, t_start):
    """Both models trained with args.seed into out_dir, evaluated, drawn and written up
    (results.json, results.md). Returns the results."""
    train_set, test_set, val_set = datasets
    os.makedirs(out_dir, exist_ok=True)
    net = build_model(args)
    write_text(model_summary(net), os.path.join(out_dir, "model_sum.txt"))
    n_layers, n_params = count_parameters(net)
    del net
    results = {"baseline": {split: mean_box_baseline(train_set.boxes, data.boxes)
                            for split, data in (("train", train_set), ("test", test_set))}}
    log.info("mean-box baseline (the training set's mean box for every image): mean IoU train %.3f, "
             "test %.3f", results["baseline"]["train"], results["baseline"]["test"])
    histories, records = {}, {}
    for key, loss_name in MODELS:
        res, histories[key], split_records = run_model(key, loss_name, datasets, out_dir, args, device)
        records.update({(key, split): r for split, r in split_records.items()})
        history, saves = histories[key], histories[key]["save_seconds"]  # over the whole run, resumes too
        results[key] = {**res, "best_epoch": history["best_epoch"], "best_score": history["best_score"],
                        "select_on": history["select_on"], "epochs_trained": len(history["epoch_seconds"]),
                        "skipped_steps": sum(history["skipped_steps"]),
                        "train_seconds": round(sum(history["epoch_seconds"]), 1),
                        "save_seconds": round(sum(w["seconds"] for w in saves), 1),
                        "files_written": len(saves)}
    results["comparison"] = {split: compare_models(records["ciou", split], records["mse", split])
                             for split in ("train", "test")}
    results["report"] = REPORT
    settings = {k: v for k, v in run_settings(args, device).items() if k in EXPERIMENT_SETTINGS}
    settings.update(n_train=len(train_set), n_test=len(test_set), n_val=len(val_set) if val_set else 0,
                    parameters=n_params, parameter_tensors=n_layers, torch=torch.__version__,
                    python=platform.python_version())
    if args.demo:
        settings.update(n_synthetic_train=args.n_train, n_synthetic_val=args.n_val, synthetic_seed=args.synthetic_seed)
    results["settings"] = settings
    log.info("drawing the figures and writing %s", os.path.join(out_dir, "results.md"))
    draw_figures(out_dir, results, histories, records, {"train": train_set.images, "test": test_set.images},
                 args.data_dir)
    settings["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    if args.resume:  # a finished run evaluated again: the first command's time is kept
        keep_earlier_wall_seconds(settings, os.path.join(out_dir, "results.json"))
    write_json(results, os.path.join(out_dir, "results.json"))
    write_text(results_markdown(results), os.path.join(out_dir, "results.md"))
    return results


def check_layout(out_dir, held, seeds, resume):
    """Refuse to mix a single run and a --seeds run in one OUT (held: the seeds of its
    seed{k}/ runs), or to start over on a run without --resume."""
    if held and not seeds:
        raise UserError(f"{out_dir} holds a --seeds run (seeds {' '.join(map(str, held))}): go on "
                        f"with it with --seeds and --resume, or choose another --out_dir")
    if seeds and holds_an_experiment(out_dir):
        raise UserError(f"{out_dir} holds a single run (ciou/, mse/): give a --seeds run its own --out_dir")
    if not resume and (held or holds_an_experiment(out_dir)):
        where = f" ({', '.join(f'seed{k}' for k in held)})" if held else ""
        raise UserError(f"{out_dir} already holds a run{where}; pass --resume to continue it, or "
                        f"choose another --out_dir")
    if seeds and not set(held) <= set(seeds):  # OUT/results.json would leave some out
        raise UserError(f"{out_dir} holds seeds {' '.join(map(str, held))}: give --seeds all of them "
                        f"(and any new ones), not {' '.join(map(str, seeds))}")


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data_dir", help="dataset built by Dataset.py (required unless --demo)")
    g.add_argument("--out_dir", required=True, help="where models, figures and results go (required)")
    demo = " ".join(f"--{k}" if v is True else f"--{k} {v}" for k, v in DEMO_TRAINING.items())
    g.add_argument("--demo", action="store_true",
                   help=f"draw a synthetic COCO tree into OUT/synthetic_coco, build it into OUT/data "
                        f"and run on it with the demo's settings ({demo}) unless given otherwise")
    for key, what in (("n_train", "train images"), ("n_val", "val (test) images"),
                      ("synthetic_seed", "tree seed")):
        g.add_argument(f"--{key}", type=int, help=f"--demo: synthetic {what} (default {DEMO[key]})")
    g = p.add_argument_group("experiment")
    g.add_argument("--seeds", type=int, nargs="+",
                   help="the experiment once per training seed, into OUT/seed{k}/, with the spread "
                        "over seeds in OUT/results.json and results.md")
    g.add_argument("--seed_index", type=int,
                   help="with --seeds: run only the seed at this 0-based place of the list (an array "
                        "task's index, e.g. $SLURM_ARRAY_TASK_ID), into its OUT/seed{k}/; --aggregate "
                        "then writes what --seeds writes (docs/runs.md)")
    g.add_argument("--aggregate", action="store_true",
                   help="OUT/results.json and results.md from the finished OUT/seed{k}/ runs (of "
                        "--seeds, or every one there); no model runs")
    g.add_argument("--redraw", action="store_true",
                   help="rewrite every figure in a finished OUT from its saved predictions and DATA "
                        "(the run's, or --data_dir); no model runs")
    g.add_argument("--check", action="store_true",
                   help="read-only check of a finished OUT against DATA: every split's images, truth "
                        "and metrics, the best epoch by the report's rule, and each model evaluated "
                        "again image by image (docs/grading.md); exit status 1 on any mismatch")
    add_training_args(p)
    # The training options whose default depends on --demo, and --seed (unset, so that
    # --seed and --seeds together can be refused).
    p.report_defaults = {a.dest: a.default for a in p._actions if a.dest in DEMO_TRAINING}
    p.set_defaults(seed=None, **{k: None for k in DEMO_TRAINING})
    for action in p._actions:
        if action.dest in DEMO_TRAINING:
            shown = "off" if p.report_defaults[action.dest] is False else p.report_defaults[action.dest]
            on_demo = "on" if DEMO_TRAINING[action.dest] is True else DEMO_TRAINING[action.dest]
            action.help += f" (default: {shown}, the report's; {on_demo} with --demo)"
        elif action.dest == "seed":
            action.help += " (default: 0)"
    return p


def resolve_args(args, parser=None):
    """Fill the options left unset: the demo's values with --demo, else the report's."""
    parser = parser or get_args_parser()
    if args.redraw or args.check or args.aggregate:
        return args
    if args.demo == bool(args.data_dir):
        raise UserError("give --data_dir DATA (a dataset built by Dataset.py) or --demo, one of the two")
    for key in DEMO_DATA:
        if getattr(args, key) is None:
            setattr(args, key, DEMO[key])
        elif not args.demo:
            raise UserError(f"--{key} applies to --demo only")
    for key in DEMO_TRAINING:
        if getattr(args, key) is None:
            setattr(args, key, DEMO[key] if args.demo else parser.report_defaults[key])
    if args.seeds is not None:
        if args.seed is not None:
            raise UserError("give --seed or --seeds, not both")
        if len(set(args.seeds)) != len(args.seeds):
            raise UserError(f"--seeds {' '.join(map(str, args.seeds))}: each seed once")
        if args.seed_index is not None and not 0 <= args.seed_index < len(args.seeds):
            raise UserError(f"--seed_index {args.seed_index}: --seeds lists {len(args.seeds)} seeds, so "
                            f"it lies between 0 and {len(args.seeds) - 1}")
    elif args.seed_index is not None:
        raise UserError("--seed_index picks one of --seeds: give --seeds too")
    if args.seed is None:
        args.seed = args.seeds[0] if args.seeds else 0
    return args


def main(args):
    if args.redraw:
        drawn = redraw(args.out_dir, args.data_dir)
        log.info("redrew %d figures in %s from its predictions and histories", len(drawn), args.out_dir)
        return drawn
    if args.aggregate:
        results = aggregate_seed_folders(args.out_dir, args.seeds)
        print(results_markdown(results))
        return results
    if args.check:
        report = check(args.out_dir, args.data_dir, pick_device(args.device))
        print(check_summary(report))
        return report["problems"]
    t_start = time.perf_counter()
    out_dir = args.out_dir
    if problem := out_dir_problem(out_dir):
        raise UserError(problem)
    held = seed_runs(out_dir)
    if args.seeds and len(args.seeds) == 1 and not held and args.seed_index is None:
        args.seeds = None  # one seed is a plain run, except in the OUT of a --seeds run
    seeds = args.seeds or [args.seed]
    if args.seed_index is not None:  # one array task: its own seed{k}/ is all it reads or writes
        seeds = [args.seeds[args.seed_index]]
        held = [k for k in held if k in seeds]
    run_dirs = {seed: os.path.join(out_dir, f"seed{seed}") if args.seeds else out_dir for seed in seeds}
    check_layout(out_dir, held, args.seeds, args.resume)
    device = pick_device(args.device)
    check_training_args(args, device)  # the options alone, before the demo's data is drawn
    if args.demo:
        drawn = {"n_train": args.n_train, "n_val": args.n_val, "synthetic_seed": args.synthetic_seed}
        args.data_dir = prepare_demo_data(out_dir, drawn, progress=not args.quiet)
    # Loaded once for every seed (with --val_fraction, held out with the first seed): the
    # seeds vary training only. Bad data stops here, before OUT is made.
    log.info("loading the data in %s", args.data_dir)
    datasets = load_splits(args.data_dir, args.val_fraction, progress=not args.quiet)
    check_training_args(args, device, len(datasets[0]))
    Sigterm.stop_here("after loading the data")
    per_seed = {}
    for seed, run_dir in run_dirs.items():
        if args.seeds:
            log.info("seed %d of %s: %s", seed, " ".join(map(str, seeds)), run_dir)
        run_args = argparse.Namespace(**{**vars(args), "seed": seed, "seeds": None})
        os.makedirs(run_dir, exist_ok=True)
        with held_lock(os.path.join(run_dir, ".lock")):  # one process writes an experiment
            # A single run's wall time counts from the command's start (data included).
            per_seed[seed] = run_experiment(run_args, run_dir, datasets, device,
                                            time.perf_counter() if args.seeds else t_start)
    if args.seeds and args.seed_index is None:
        results = aggregate_results(per_seed, round(time.perf_counter() - t_start, 1))
        if args.resume:
            keep_earlier_wall_seconds(results["settings"], os.path.join(out_dir, "results.json"))
        markdown = results_markdown(results)
        write_json(results, os.path.join(out_dir, "results.json"))
        write_text(markdown, os.path.join(out_dir, "results.md"))
    else:
        results = per_seed[seeds[0]]
        markdown = results_markdown(results)
    print(markdown)
    log.info("outputs in %s (results.md, results.json, figures; models in %s)", out_dir,
             ", ".join(os.path.join(d, m) for d in run_dirs.values() for m, _ in MODELS))
    return results


if __name__ == "__main__":
    parser = get_args_parser()
    args = parser.parse_args()
    trains = not (args.check or args.redraw or args.aggregate)
    outcome = command(lambda: main(resolve_args(args, parser)), log, stops_on_sigterm=trains)
    sys.exit(1 if args.check and outcome else 0)
