"""The margins tests/test_photos.py asserts, measured: its run on seeds 0 and 1
(docs/photos.md).

    python benchmarks/photo_margins.py OUT
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/photo_margins.py OUT

The run: HW5Net at the report's width, the report's recipe (--single_backward: the same
gradients) for 3 epochs on the CPU, on every 8th training photo (256) and every 4th test
photo (128) of coco_thumbs. Prints, per seed, the best epoch's test accuracy against the
majority class's share and its test mean IoU against the mean box's.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import train  # noqa: E402
from cli import HelpFormatter  # noqa: E402
from Dataset import MyCOCODataset, build_dataset  # noqa: E402
from synthetic.coco import slice_of_coco  # noqa: E402
from utils import mean_box_baseline  # noqa: E402

N_IMAGES = {"train": 256, "val": 128}  # as tests/test_photos.py
EPOCHS = 3


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("out", help="where the slice of coco_thumbs, its dataset and the runs go")
    p.add_argument("--thumbs", default=os.path.join(os.path.dirname(ROOT), "shared", "coco_thumbs"),
                   help="the coco_thumbs tree")
    return p


def main(args):
    data = os.path.join(args.out, "data")
    if not os.path.exists(data):  # built once: the AVX2 run uses the plain run's
        slice_of_coco(args.thumbs, os.path.join(args.out, "coco"), N_IMAGES)
        build_dataset(os.path.join(args.out, "coco"), data, workers=2, progress=False, figure=False)
    train_set, test_set = MyCOCODataset(data, train=True), MyCOCODataset(data, train=False)
    chance = float(test_set.labels.bincount().max()) / len(test_set)
    baseline = mean_box_baseline(train_set.boxes, test_set.boxes)
    kernels = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    for seed in (0, 1):
        run = train.get_args_parser().parse_args(
            ["--data_dir", data, "--out_dir", os.path.join(args.out, f"run_{kernels}_{seed}"), "--epochs",
             str(EPOCHS), "--seed", str(seed), "--single_backward", "--device", "cpu", "--quiet"])
        h = train.main(run)
        b = h["best_epoch"] - 1
        accuracy, iou = h["test"]["accuracy"][b], h["test"]["mean_iou"][b]
        print(f"kernels {kernels} seed {seed}: best epoch {b + 1} of {EPOCHS}, test accuracy {accuracy:.3f} "
              f"(chance {chance:.3f}, margin {accuracy - chance:+.3f}); test mean IoU {iou:.3f} "
              f"(mean box {baseline:.3f}, margin {iou - baseline:+.3f})", flush=True)


if __name__ == "__main__":  # build_dataset's workers import this file again
    main(get_args_parser().parse_args())
