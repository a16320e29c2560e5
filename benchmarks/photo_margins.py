"""The margins tests/test_photos.py asserts, measured: its run on seeds 0 and 1.

    python benchmarks/photo_margins.py OUT
    ATEN_CPU_CAPABILITY=avx2 python benchmarks/photo_margins.py OUT   # AVX2 kernels

prints, per seed, the best epoch's test accuracy against the majority class's share and
its test mean IoU against the mean-box baseline.
"""
import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from Dataset import MyCOCODataset, build_dataset  # noqa: E402
from hw5_main import mean_box_baseline  # noqa: E402
from test_photos import photo_run, slice_of_thumbs  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="where the slice of coco_thumbs, its dataset and the runs go")
    return p


def main(args):
    out = args.out
    data = os.path.join(out, "data")
    if not os.path.exists(data):
        slice_of_thumbs(os.path.join(out, "coco"))
        build_dataset(os.path.join(out, "coco"), data, workers=2, progress=False, figure=False)
    train_set, test_set = MyCOCODataset(data, train=True), MyCOCODataset(data, train=False)
    chance = float(test_set.labels.bincount().max()) / len(test_set)
    baseline = mean_box_baseline(train_set.boxes, test_set.boxes)
    kernels = os.environ.get("ATEN_CPU_CAPABILITY", "default")
    for seed in (0, 1):
        h = photo_run(data, os.path.join(out, f"run_{kernels}_{seed}"), seed)
        b = h["best_epoch"] - 1
        print(f"kernels {kernels} seed {seed}: best epoch {b + 1}, test accuracy {h['test']['accuracy'][b]:.3f} "
              f"(chance {chance:.3f}, margin {h['test']['accuracy'][b] - chance:+.3f}); test mean IoU "
              f"{h['test']['mean_iou'][b]:.3f} (mean box {baseline:.3f}, margin {h['test']['mean_iou'][b] - baseline:+.3f})",
              flush=True)


if __name__ == "__main__":  # build_dataset's workers import this file again
    main(get_args_parser().parse_args())
