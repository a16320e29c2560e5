"""The README's pictures, from a finished demo run, made small enough to commit:

    python hw5_main.py --demo --out_dir runs/demo
    python docs/figures/make.py runs/demo

Each is scaled to 900 px wide and reduced to a 128-colour palette (under 300 KB).
Only the demo's synthetic drawings go here, never COCO photos (their licences).
"""
import argparse
import os

from PIL import Image

FIGURES = {"ciou_test_preds.png": "demo_ciou_test_preds.png", "ciou_curves.png": "demo_ciou_curves.png"}


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("out", help="the demo run's --out_dir (its ciou_test_preds.png and ciou_curves.png)")
    return p


def main(args):
    for source, target in FIGURES.items():
        image = Image.open(os.path.join(args.out, source)).convert("RGB")
        width = min(900, image.width)
        image = image.resize((width, round(image.height * width / image.width)), Image.LANCZOS)
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), target)
        image.quantize(colors=128).save(path, optimize=True)
        print(path, os.path.getsize(path) // 1024, "KB")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
