"""The report's experiment (Section 4): HW5Net trained with CIoU and with MSE, compared.

    python hw5_main.py --data_dir data/hw5 --out_dir runs/hw5     # on a dataset built by Dataset.py
    python hw5_main.py --demo --out_dir runs/demo                  # no COCO: synthetic data, ~10 min on 2 CPU cores

Trains both models (train.py), evaluates the best of each on the training and test
splits, and writes into OUT: ciou/ and mse/ (best_model.pt and history.json; checkpoint.pt
while a model trains), the confusion matrices, prediction grids and training curves of the
report's Figs. 14-20, model_sum.txt, results.json and results.md (the run's numbers
beside the report's, with the mean-box baseline and the settings).
"""
import argparse
import logging
import os
import platform
import sys
import time

import torch

from Dataset import DatasetError, build_dataset
from network import count_parameters, model_summary
from train import (DeviceBatches, RunFiles, TrainingError, add_training_args, build_model,
                   load_checkpoint, load_datasets, load_model_state, make_criteria, pick_device,
                   seed_everything, train)
from utils import (box_iou_per_image, display_preds, evaluation, plot_cm, plot_history,
                   write_json, write_text)

log = logging.getLogger("hw5_main")

MODELS = (("ciou", "CIoU"), ("mse", "MSE"))

# Report Section 4 (SPEC.md): accuracy as a fraction, mean IoU.
REPORT = {
    "ciou": {"train": {"accuracy": 0.996, "mean_iou": 0.68}, "test": {"accuracy": 0.889, "mean_iou": 0.61}},
    "mse": {"train": {"accuracy": 0.994, "mean_iou": 0.67}, "test": {"accuracy": 0.896, "mean_iou": 0.57}},
}

# The demo: a synthetic COCO tree small enough for about 10 minutes on 2 CPU cores
# (a --single_backward training step of HW5Net at batch 16 costs about 0.57 s there).
# Each option that is left at its default on the command line takes the demo's value.
DEMO = {"n_train": 720, "n_val": 200, "synthetic_seed": 0, "epochs": 8, "single_backward": True}
DEFAULT_EPOCHS = 30


def mean_box_baseline(train_boxes, test_boxes):
    """Mean IoU on the test split of one box for every image: the training set's mean
    box. A model that learned nothing about where the object is scores about this."""
    mean_box = train_boxes.float().mean(0, keepdim=True).expand_as(test_boxes)
    return float(box_iou_per_image(mean_box, test_boxes.float()).mean())


# ---------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------
def prepare_demo_data(out_dir, args):
    """Generate the synthetic COCO tree and build the dataset inside OUT; an existing
    build is reused (a resumed demo)."""
    from synthetic_coco import make_synthetic_coco
    data_dir = os.path.join(out_dir, "data")
    if os.path.exists(os.path.join(data_dir, "build_summary.json")):
        log.info("demo: reusing the dataset in %s", data_dir)
        return data_dir
    coco_dir = os.path.join(out_dir, "synthetic_coco")
    t0 = time.perf_counter()
    make_synthetic_coco(coco_dir, args.n_train, args.n_val, args.synthetic_seed, year=2014)
    log.info("demo: synthetic COCO tree (%d train, %d val images) in %s, %.0fs",
             args.n_train, args.n_val, coco_dir, time.perf_counter() - t0)
    build_dataset(coco_dir, data_dir, year=2014, workers=os.cpu_count() or 1,
                  progress=not args.quiet)
    return data_dir


# ---------------------------------------------------------------------------------
# One model: train, then evaluate its best state on every split
# ---------------------------------------------------------------------------------
def run_model(key, loss_name, datasets, out_dir, args, device):
    """Train the `key` model into OUT/key, reload its best state and evaluate it.
    Returns (results per split, history)."""
    train_set, test_set, val_set = datasets
    run_dir = os.path.join(out_dir, key)
    # With --resume, a model that has started continues (or, finished, is only evaluated);
    # one that never started starts.
    args = argparse.Namespace(**{**vars(args), "loss": key,
                                 "resume": args.resume and RunFiles(run_dir).holds_a_run()})
    seed_everything(args.seed)  # both models start from the same seeded weights
    model = build_model(args)
    model, history = train(model, train_set, test_set, run_dir, args, device, val_set,
                           progress=not args.quiet)
    best_path = os.path.join(run_dir, "best_model.pt")
    load_model_state(model, load_checkpoint(best_path), best_path)
    criterion_cls, criterion_box, _ = make_criteria(key)
    splits = {"train": train_set.subset(train_set.files, augment=False), "test": test_set}
    if val_set is not None:
        splits["val"] = val_set
    results = {}
    for split, data in splits.items():
        cm, res = evaluation(model, DeviceBatches(data, args.eval_batch_size, device),
                             criterion_cls, criterion_box, device, order=not args.raw_boxes,
                             amp=args.amp)
        results[split] = {k: v for k, v in res.items() if k != "predictions"}
        results[split]["confusion_matrix"] = cm.tolist()
        if split == "val":
            continue
        plot_cm(cm, os.path.join(out_dir, f"{key}_{split}_cm.png"), loss_name, split,
                res["accuracy"], res["mean_iou"])
        display_preds(data.images, res["predictions"], os.path.join(out_dir, f"{key}_{split}_preds.png"),
                      f"{loss_name} model on {split} data (best epoch {history['best_epoch']}): "
                      f"ground truth green, prediction red", seed=args.seed)
    plot_history(history, os.path.join(out_dir, f"{key}_curves.png"), loss_name)
    log.info("%s model (best epoch %s): train accuracy %.3f mIoU %.3f | test accuracy %.3f "
             "mIoU %.3f", loss_name, history["best_epoch"], results["train"]["accuracy"],
             results["train"]["mean_iou"], results["test"]["accuracy"], results["test"]["mean_iou"])
    return results, history


# ---------------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------------
def results_markdown(results):
    """results.md: the run's table beside the report's, the baseline and the settings."""
    s = results["settings"]
    lines = ["# HW5Net: CIoU vs MSE box loss", ""]
    if s["demo"]:
        lines += ["Demo run on synthetic data (drawn buses, cats and pizzas). The report's "
                  "numbers are for COCO 2014 and are shown for scale only.", ""]
    lines += ["| model | split | accuracy | mean IoU | report accuracy | report mean IoU |",
              "|---|---|---|---|---|---|"]
    for split in ("train", "test"):
        for key, name in MODELS:
            ours, rep = results[key][split], REPORT[key][split]
            lines.append(f"| {name} | {split} | {100 * ours['accuracy']:.1f}% | {ours['mean_iou']:.3f} "
                         f"| {100 * rep['accuracy']:.1f}% | {rep['mean_iou']:.2f} |")
    b = results["baseline"]
    lines += ["", f"Mean-box baseline (the training set's mean box for every test image): "
                  f"test mean IoU {b['mean_box_test_iou']:.3f}.", ""]
    for key, name in MODELS:
        r = results[key]
        skipped = (f"; {r['skipped_steps']} training steps skipped for a non-finite loss or "
                   f"gradient" if r["skipped_steps"] else "")
        lines.append(f"- {name}: best epoch {r['best_epoch']} of {r['epochs_trained']} "
                     f"(selected on {r['select_on']}); {r['train_seconds']:.0f} s of epochs (training and "
                     f"per-epoch evaluation), {r['save_seconds']:.1f} s writing files ({r['files_written']}: "
                     f"checkpoints and the best model){skipped}")
    lines += ["", "## Settings", ""]
    for k in ("device", "data_dir", "n_train", "n_test", "n_val", "epochs", "batch_size", "lr",
              "betas", "seed", "boxes", "backward", "augment", "amp", "learnable_res", "torch",
              "wall_seconds"):
        lines.append(f"- {k}: {s[k]}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------
class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in the help, except the unset ones whose help already says them."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=_HelpFormatter)
    p.add_argument("--data_dir", help="dataset built by Dataset.py (required unless --demo)")
    p.add_argument("--out_dir", required=True, help="where models, figures and results go (required)")
    p.add_argument("--demo", action="store_true",
                   help=f"generate a synthetic COCO tree in OUT/synthetic_coco, build it into "
                        f"OUT/data and run on it with demo settings ({DEMO['epochs']} epochs, "
                        f"--single_backward) unless given otherwise")
    p.add_argument("--n_train", type=int, default=None,
                   help=f"--demo: synthetic train images (default {DEMO['n_train']})")
    p.add_argument("--n_val", type=int, default=None,
                   help=f"--demo: synthetic val (test) images (default {DEMO['n_val']})")
    p.add_argument("--synthetic_seed", type=int, default=None,
                   help=f"--demo: synthetic tree seed (default {DEMO['synthetic_seed']})")
    add_training_args(p)
    # Two training options whose default depends on --demo.
    p.set_defaults(epochs=None, single_backward=None)
    for action in p._actions:
        if action.dest == "epochs":
            action.help = (f"epochs per model (default {DEFAULT_EPOCHS}, the report's; "
                           f"{DEMO['epochs']} with --demo)")
        elif action.dest == "single_backward":
            action.help += " (default: off; on with --demo)"
    return p


def resolve_args(args):
    """Fill the options left unset: the demo's values with --demo, else the report's."""
    if args.demo == bool(args.data_dir):
        raise TrainingError("give --data_dir DATA (a dataset built by Dataset.py) or --demo, "
                            "one of the two")
    for key in ("n_train", "n_val", "synthetic_seed"):
        if getattr(args, key) is None:
            setattr(args, key, DEMO[key])
        elif not args.demo:
            raise TrainingError(f"--{key} applies to --demo only")
    if args.epochs is None:
        args.epochs = DEMO["epochs"] if args.demo else DEFAULT_EPOCHS
    if args.single_backward is None:
        args.single_backward = args.demo and DEMO["single_backward"]
    return args


def main(args):
    t_start = time.perf_counter()
    out_dir = args.out_dir
    if not args.resume:
        for key, _ in MODELS:
            if RunFiles(os.path.join(out_dir, key)).holds_a_run():
                raise TrainingError(f"{out_dir} already holds a run ({key}/); pass --resume to "
                                    f"continue it, or choose another --out_dir")
    device = pick_device(args.device)
    args.data_dir = prepare_demo_data(out_dir, args) if args.demo else args.data_dir
    datasets = load_datasets(args, progress=not args.quiet)  # bad data stops before OUT is made
    train_set, test_set, val_set = datasets
    os.makedirs(out_dir, exist_ok=True)

    seed_everything(args.seed)
    net = build_model(args)
    write_text(model_summary(net), os.path.join(out_dir, "model_sum.txt"))
    n_layers, n_params = count_parameters(net)
    del net

    results = {"baseline": {"mean_box_test_iou": mean_box_baseline(train_set.boxes, test_set.boxes)}}
    log.info("mean-box baseline: test mean IoU %.3f", results["baseline"]["mean_box_test_iou"])
    for key, loss_name in MODELS:
        res, history = run_model(key, loss_name, datasets, out_dir, args, device)
        # Epoch times (training and the per-epoch evaluation) and file writes, each summed
        # over the whole run, a resumed one included.
        saves = history.get("save_seconds", [])
        results[key] = {**res, "best_epoch": history["best_epoch"],
                        "best_score": history["best_score"], "select_on": history["select_on"],
                        "epochs_trained": len(history["epoch_seconds"]),
                        "skipped_steps": sum(history.get("skipped_steps", [])),
                        "train_seconds": round(sum(history["epoch_seconds"]), 1),
                        "save_seconds": round(sum(w["seconds"] for w in saves), 1),
                        "files_written": len(saves)}
    results["report"] = REPORT
    results["settings"] = {
        "demo": args.demo, "device": str(device), "data_dir": args.data_dir,
        "n_train": len(train_set), "n_test": len(test_set),
        "n_val": len(val_set) if val_set is not None else 0,
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
        "betas": [args.beta1, args.beta2], "seed": args.seed,
        "boxes": "raw (as the report's code)" if args.raw_boxes else "ordered (order_boxes)",
        "backward": "single" if args.single_backward else "two calls (as the report)",
        "augment": args.augment, "amp": args.amp,
        "learnable_res": args.learnable_res, "parameters": n_params, "parameter_tensors": n_layers,
        "torch": torch.__version__, "python": platform.python_version(),
        "wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    if args.demo:
        results["settings"].update(n_synthetic_train=args.n_train, n_synthetic_val=args.n_val,
                                   synthetic_seed=args.synthetic_seed)
    write_json(results, os.path.join(out_dir, "results.json"))
    markdown = results_markdown(results)
    write_text(markdown, os.path.join(out_dir, "results.md"))
    print(markdown)
    log.info("outputs in %s (results.md, results.json, figures; models in %s/ciou and %s/mse)",
             out_dir, out_dir, out_dir)
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        main(resolve_args(get_args_parser().parse_args()))
    except (TrainingError, DatasetError) as e:
        log.error("%s", e)
        sys.exit(2)
