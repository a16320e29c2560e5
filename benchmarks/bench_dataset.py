"""Dataset build, per image: ours (1 worker, 2 workers) against the report's skimage loop and
against decoding alone, the floor (docs/performance.md):

    python benchmarks/bench_dataset.py --n_images 200 --repeats 3
    python benchmarks/bench_dataset.py --n_images 200 --repeats 3 --image_dir ../shared/coco_mini/train2017

on generated COCO-sized JPEGs, or on the real JPEGs of --image_dir. Each figure is the
median of --repeats timed runs after one untimed warm-up (which also brings the files into
the page cache). Decoding, resizing and writing are timed; the annotation filter is not.
"""
import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import Dataset  # noqa: E402
from cli import HelpFormatter  # noqa: E402
from synthetic.coco import make_synthetic_coco  # noqa: E402


def report_loop(tasks):
    """The report's per-image code path: skimage imread, resize(anti_aliasing=True), imsave."""
    from skimage import io, transform
    for src, dst, *_ in tasks:
        img = io.imread(src)
        if img.ndim == 2:
            img = np.stack([img] * 3, axis=-1)
        img = transform.resize(img, (256, 256), anti_aliasing=True, preserve_range=True)
        io.imsave(dst, img.astype(np.uint8), check_contrast=False)


def decode_only(tasks):
    for src, *_ in tasks:
        with open(src, "rb") as f:
            raw = f.read()
        cv2.imdecode(np.frombuffer(raw, np.uint8), Dataset.IMREAD_FLAGS)


def ours_one_worker(tasks):
    for task in tasks:
        Dataset.process_image(task)


def ours_pool(pool, tasks):
    for _ in pool.imap_unordered(Dataset.process_image, tasks, chunksize=16):
        pass


def pool_startup_seconds(workers):
    """Seconds to start the spawn pool and have every worker import Dataset (torch)."""
    t0 = time.perf_counter()
    with get_context("spawn").Pool(workers, initializer=Dataset._init_worker) as pool:
        pool.map(abs, range(workers), chunksize=1)
    return time.perf_counter() - t0


def image_tasks(args, work):
    """(src, dst, width, height, quality) tasks over generated images, or over the real
    JPEGs of --image_dir repeated up to --n_images."""
    out_dir = os.path.join(work, "out")
    if args.image_dir:
        names = sorted(n for n in os.listdir(args.image_dir) if n.lower().endswith(".jpg"))
        if not names:
            raise SystemExit(f"no .jpg files in {args.image_dir}")
        tasks = []
        for i in range(args.n_images):
            src = os.path.join(args.image_dir, names[i % len(names)])
            h, w = cv2.imread(src, Dataset.IMREAD_FLAGS).shape[:2]
            tasks.append((src, os.path.join(out_dir, f"{i:06d}.jpg"), w, h, 95))
        return tasks, out_dir, f"real JPEGs from {args.image_dir}"
    make_synthetic_coco(os.path.join(work, "coco"), n_train=args.n_images, n_val=0, seed=0)
    src_dir = os.path.join(work, "coco", "train2014")
    with open(os.path.join(work, "coco", "annotations", "instances_train2014.json")) as f:
        images = json.load(f)["images"]
    tasks = [(os.path.join(src_dir, im["file_name"]), os.path.join(out_dir, im["file_name"]),
              im["width"], im["height"], 95) for im in images]
    return tasks, out_dir, "generated COCO-sized JPEGs (640x480 and similar)"


def timed(fn, tasks, repeats, out_dir):
    """ms per image, the median of repeats runs after a warm-up."""
    times = []
    for _ in range(repeats + 1):
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        t0 = time.perf_counter()
        fn(tasks)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]) / len(tasks) * 1000.0


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--n_images", type=int, default=200, help="images per run")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    p.add_argument("--image_dir", help="time the real JPEGs of this folder (e.g. ../shared/coco_mini/train2017), "
                                       "repeated up to --n_images (default: generated ones)")
    return p


def main(args):
    workers = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="bench_dataset_") as work:
        tasks, out_dir, source = image_tasks(args, work)
        cv2.setNumThreads(1)  # one core for the single-process figures
        rows = {
            "report loop (skimage, 1 process)": timed(report_loop, tasks, args.repeats, out_dir),
            "decode only (cv2, 1 process)": timed(decode_only, tasks, args.repeats, out_dir),
            "ours, 1 worker": timed(ours_one_worker, tasks, args.repeats, out_dir),
        }
        # The pool's start (each worker imports torch with Dataset) is a fixed cost, timed
        # apart; the throughput is that of a started pool.
        startup = pool_startup_seconds(workers)
        with get_context("spawn").Pool(workers, initializer=Dataset._init_worker) as pool:
            rows[f"ours, {workers} workers"] = timed(lambda t: ours_pool(pool, t), tasks, args.repeats, out_dir)
    report, decode = rows["report loop (skimage, 1 process)"], rows["decode only (cv2, 1 process)"]
    print(f"\n{len(tasks)} {source}, median of {args.repeats} runs after a warm-up, "
          f"{workers} cores; pool start-up {startup:.1f} s (once per build)\n")
    print("| method | ms / image | images / s | vs report loop | vs decode-only |")
    print("|---|---|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {1000 / ms:.0f} | {report / ms:.1f}x | {ms / decode:.2f}x |")
    return rows


if __name__ == "__main__":  # the spawned workers import this file again
    main(get_args_parser().parse_args())
