"""Dataset build throughput: ours (1 worker, all workers) vs the report's skimage loop,
and vs decode-only (the floor), per image, on generated COCO-sized JPEGs.

    python benchmarks/bench_dataset.py --n_images 200 --repeats 3

Each figure is the median of --repeats timed runs after one untimed warm-up run (which
also brings the files into the page cache). Decoding, resizing and writing are timed;
the annotation filter is not (it is the same few milliseconds for every method).
"""
import argparse
import json
import logging
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
from synthetic.coco import make_synthetic_coco  # noqa: E402

log = logging.getLogger("bench_dataset")


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
    times = []
    for r in range(repeats + 1):  # the first run is the warm-up
        shutil.rmtree(out_dir, ignore_errors=True)
        os.makedirs(out_dir)
        t0 = time.perf_counter()
        fn(tasks)
        dt = time.perf_counter() - t0
        if r > 0:
            times.append(dt)
    return statistics.median(times) / len(tasks) * 1000.0  # ms per image


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n_images", type=int, default=200, help="generated COCO-sized images")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="pool size for 'all workers'")
    p.add_argument("--image_dir", default=None,
                   help="time real JPEGs from this folder (e.g. ../shared/coco_mini/train2017) "
                        "instead of generated ones")
    p.add_argument("--work_dir", default=None, help="scratch directory (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p


def main(args):
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_dataset_")
    try:
        tasks, out_dir, source = image_tasks(args, work)
        cv2.setNumThreads(1)  # one core for the single-process figures
        rows = {
            "report loop (skimage, 1 process)": timed(report_loop, tasks, args.repeats, out_dir),
            "decode only (cv2, 1 process)": timed(decode_only, tasks, args.repeats, out_dir),
            "ours, 1 worker": timed(ours_one_worker, tasks, args.repeats, out_dir),
        }
        # The pool's start (each worker imports torch with Dataset) is a fixed cost,
        # timed apart; the throughput is that of a started pool.
        startup = pool_startup_seconds(args.workers)
        with get_context("spawn").Pool(args.workers, initializer=Dataset._init_worker) as pool:
            rows[f"ours, {args.workers} workers"] = timed(lambda t: ours_pool(pool, t), tasks,
                                                          args.repeats, out_dir)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    report = rows["report loop (skimage, 1 process)"]
    decode = rows["decode only (cv2, 1 process)"]
    print(f"\n{len(tasks)} {source}, median of {args.repeats} runs after a warm-up, "
          f"{os.cpu_count()} cores; pool start-up {startup:.1f} s (once per build)\n")
    print("| method | ms / image | images / s | vs report loop | vs decode-only |")
    print("|---|---|---|---|---|")
    for name, ms in rows.items():
        print(f"| {name} | {ms:.2f} | {1000 / ms:.0f} | {report / ms:.1f}x | {ms / decode:.2f}x |")
    extra = f" --image_dir {args.image_dir}" if args.image_dir else ""
    print(f"\ncommand: python benchmarks/bench_dataset.py --n_images {args.n_images} "
          f"--repeats {args.repeats} --workers {args.workers}{extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"ms_per_image": rows, "n_images": len(tasks), "repeats": args.repeats,
                       "source": source, "pool_startup_s": startup}, f, indent=2)
    return rows


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main(get_args_parser().parse_args())
