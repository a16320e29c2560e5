"""Dataset.py: the dominant-object rule, the written dataset, bad input, MyCOCODataset."""
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import Dataset
from Dataset import DatasetError, MyCOCODataset, build_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def expected_from_json(path):
    """The dataset rule computed independently of the builder: plain JSON, no pycocotools.
    Returns {file_name: (class index, [x, y, w, h] scaled to 256x256)}."""
    with open(path) as f:
        coco = json.load(f)
    images = {im["id"]: im for im in coco["images"]}
    big = {}
    for a in coco["annotations"]:
        if a["category_id"] in (6, 17, 59) and not a["iscrowd"] and a["area"] > 40000:
            big.setdefault(a["image_id"], []).append(a)
    expected = {}
    for image_id, anns in big.items():
        if len(anns) != 1:
            continue
        im, (x, y, w, h) = images[image_id], anns[0]["bbox"]
        sx, sy = 256 / im["width"], 256 / im["height"]
        expected[im["file_name"]] = ({6: 0, 17: 1, 59: 2}[anns[0]["category_id"]],
                                     [x * sx, y * sy, w * sx, h * sy])
    return expected


def assert_matches(data_dir, ann_path, folder):
    expected = expected_from_json(ann_path)
    with open(os.path.join(data_dir, f"{folder}.pkl"), "rb") as f:
        records = pickle.load(f)
    with open(os.path.join(data_dir, "inv_map.pkl"), "rb") as f:
        inv_map = pickle.load(f)
    assert inv_map == {6: 0, 17: 1, 59: 2}
    assert sorted(records) == sorted(expected)
    for name, (label, bbox) in expected.items():
        assert inv_map[records[name]["category_id"]] == label
        np.testing.assert_allclose(records[name]["bbox"], bbox, rtol=1e-6)
        img = cv2.imread(os.path.join(data_dir, folder, name))
        assert img.shape == (256, 256, 3)
    assert sorted(os.listdir(os.path.join(data_dir, folder))) == sorted(expected)


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def mini_data(coco_mini_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("mini_data"))
    summaries = build_dataset(coco_mini_dir, out, year=2017, workers=2, progress=False)
    return out, summaries


def test_rule_on_coco_mini(coco_mini_dir, mini_data):
    out, summaries = mini_data
    for split, folder in (("train", "train_data"), ("val", "test_data")):
        ann = os.path.join(coco_mini_dir, "annotations", f"instances_{split}2017.json")
        assert_matches(out, ann, folder)
        assert summaries[folder]["kept"] == len(expected_from_json(ann))
    assert os.path.getsize(os.path.join(out, "sample_images.png")) > 10_000


def test_coco_mini_area_not_bbox(coco_mini_dir, mini_data):
    """An image whose bbox w*h clears 40000 but whose segmentation area does not must
    be rejected (coco_mini holds such cases)."""
    out, _ = mini_data
    with open(os.path.join(coco_mini_dir, "annotations", "instances_train2017.json")) as f:
        coco = json.load(f)
    by_image = {}
    for a in coco["annotations"]:
        if a["category_id"] in (6, 17, 59) and not a["iscrowd"]:
            by_image.setdefault(a["image_id"], []).append(a)
    tricky = [i for i, anns in by_image.items()
              if not any(a["area"] > 40000 for a in anns)
              and any(a["bbox"][2] * a["bbox"][3] > 40000 for a in anns)]
    assert tricky, "coco_mini should hold an image with bbox area > 40000 but area < 40000"
    names = {im["id"]: im["file_name"] for im in coco["images"]}
    with open(os.path.join(out, "train_data.pkl"), "rb") as f:
        records = pickle.load(f)
    assert not any(names[i] in records for i in tricky)


def test_report_layout_is_accepted(coco_mini_dir, tmp_path):
    """annotations{year}/ and test{year}/ (the report's own layout) work as well."""
    root = tmp_path / "coco"
    root.mkdir()
    os.symlink(os.path.join(coco_mini_dir, "annotations"), root / "annotations2017")
    os.symlink(os.path.join(coco_mini_dir, "train2017"), root / "train2017")
    os.symlink(os.path.join(coco_mini_dir, "val2017"), root / "test2017")
    layout = Dataset.resolve_coco_layout(str(root), 2017)
    assert layout["val"][1].endswith("test2017")
    assert layout["train"][0].endswith(os.path.join("annotations2017", "instances_train2017.json"))


# --------------------------------------------------------------------- synthetic data
def test_synthetic_tree_has_every_case(synthetic_tree):
    from pycocotools.coco import COCO
    import contextlib
    import io
    path = os.path.join(synthetic_tree, "annotations", "instances_train2014.json")
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(path)  # pycocotools reads it as it reads COCO
    cases = {im["synthetic_case"] for im in coco.dataset["images"]}
    assert cases == {"single", "single_plus_small", "single_plus_other_large",
                     "single_plus_crowd", "two_dominant", "none", "crowd_only"}
    anns = coco.dataset["annotations"]
    assert any(a["iscrowd"] and a["area"] > 40000 for a in anns)
    assert any(a["category_id"] not in (6, 17, 59) and a["area"] > 40000 for a in anns)
    for a in anns[:50]:
        x, y, w, h = a["bbox"]
        assert a["area"] < w * h  # mask area, not box area
        assert a["area"] == pytest.approx(float(coco.annToMask(a).sum()), rel=0.02)
    gray = [im for im in coco.dataset["images"] if cv2.imread(
        os.path.join(synthetic_tree, "train2014", im["file_name"]), cv2.IMREAD_UNCHANGED).ndim == 2]
    assert gray, "the synthetic tree should hold grayscale JPEGs"


def test_synthetic_is_deterministic(tmp_path):
    from synthetic.coco import make_synthetic_coco
    a = make_synthetic_coco(str(tmp_path / "a"), 6, 3, seed=5)
    b = make_synthetic_coco(str(tmp_path / "b"), 6, 3, seed=5)
    c = make_synthetic_coco(str(tmp_path / "c"), 6, 3, seed=6)
    assert a == b and a != c
    for name in os.listdir(tmp_path / "a" / "train2014"):
        assert (tmp_path / "a" / "train2014" / name).read_bytes() == \
            (tmp_path / "b" / "train2014" / name).read_bytes()


def test_rule_on_synthetic(synthetic_tree, synthetic_data):
    out, summaries = synthetic_data
    for split, folder in (("train", "train_data"), ("val", "test_data")):
        assert_matches(out, os.path.join(synthetic_tree, "annotations", f"instances_{split}2014.json"),
                       folder)
    rejected = summaries["train_data"]["rejected"]
    assert rejected["no dominant object"] > 0 and rejected["several dominant objects"] > 0


def test_grayscale_becomes_rgb(synthetic_tree, synthetic_data):
    out, _ = synthetic_data
    with open(os.path.join(out, "train_data.pkl"), "rb") as f:
        records = pickle.load(f)
    gray = [n for n in records if cv2.imread(os.path.join(synthetic_tree, "train2014", n),
                                             cv2.IMREAD_UNCHANGED).ndim == 2]
    assert gray
    img = cv2.imread(os.path.join(out, "train_data", gray[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (256, 256, 3)


def test_rerun_gives_same_result_and_cleans_partial(synthetic_tree, tmp_path):
    out = str(tmp_path / "data")
    build_dataset(synthetic_tree, out, workers=1, progress=False, figure=False)
    first = {n: open(os.path.join(out, "train_data", n), "rb").read()
             for n in os.listdir(os.path.join(out, "train_data"))}
    with open(os.path.join(out, "train_data.pkl"), "rb") as f:
        first_records = pickle.load(f)
    # What an interrupted run leaves behind, and a stray file in the old output.
    os.makedirs(os.path.join(out, ".train_data.partial"))
    open(os.path.join(out, ".train_data.partial", "junk.jpg"), "w").close()
    open(os.path.join(out, "train_data", "stale.jpg"), "w").close()
    build_dataset(synthetic_tree, out, workers=2, progress=False, figure=False)
    second = {n: open(os.path.join(out, "train_data", n), "rb").read()
              for n in os.listdir(os.path.join(out, "train_data"))}
    with open(os.path.join(out, "train_data.pkl"), "rb") as f:
        assert pickle.load(f) == first_records
    assert second == first
    assert not [n for n in os.listdir(out) if n.startswith(".") or n.endswith(".tmp")]


# --------------------------------------------------------------------------- bad input
def test_missing_directory():
    with pytest.raises(DatasetError, match="COCO directory not found: /no/such/coco"):
        Dataset.resolve_coco_layout("/no/such/coco", 2014)


def test_wrong_year_names_the_right_one(coco_mini_dir):
    with pytest.raises(DatasetError, match=r"instances_train2014\.json.*pass --year 2017"):
        Dataset.resolve_coco_layout(coco_mini_dir, 2014)


def _copy_tree(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_annotation_and_image_dir(synthetic_tree, tmp_path):
    root = _copy_tree(synthetic_tree, tmp_path / "coco")
    os.remove(os.path.join(root, "annotations", "instances_val2014.json"))
    with pytest.raises(DatasetError, match="instances_val2014.json"):
        Dataset.resolve_coco_layout(root, 2014)
    root2 = _copy_tree(synthetic_tree, tmp_path / "coco2")
    shutil.rmtree(os.path.join(root2, "val2014"))
    with pytest.raises(DatasetError, match="missing image directory .*val2014"):
        Dataset.resolve_coco_layout(root2, 2014)


def test_malformed_json(synthetic_tree, tmp_path):
    root = _copy_tree(synthetic_tree, tmp_path / "coco")
    path = os.path.join(root, "annotations", "instances_train2014.json")
    with open(path, "w") as f:
        f.write('{"images": [')
    out = str(tmp_path / "out")
    with pytest.raises(DatasetError, match="instances_train2014.json: not valid JSON"):
        build_dataset(root, out, progress=False)
    assert not os.path.exists(os.path.join(out, "train_data"))  # no work before the check
    with open(path, "w") as f:
        json.dump({"images": []}, f)
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        Dataset.load_coco(path)


def test_bad_images_warn_and_count(synthetic_tree, tmp_path, caplog):
    root = _copy_tree(synthetic_tree, tmp_path / "coco")
    kept = expected_from_json(os.path.join(root, "annotations", "instances_train2014.json"))
    missing, truncated = sorted(kept)[:2]
    os.remove(os.path.join(root, "train2014", missing))
    path = os.path.join(root, "train2014", truncated)
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="Dataset"):
        summaries = build_dataset(root, str(tmp_path / "out"), workers=2, progress=False,
                                  figure=False)
    summary = summaries["train_data"]
    assert summary["rejected"]["unreadable"] == 2
    assert summary["kept"] == len(kept) - 2
    text = caplog.text
    assert missing in text and "missing on disk" in text
    assert truncated in text and "truncated" in text


def test_zero_kept_is_an_error(synthetic_tree, tmp_path):
    root = _copy_tree(synthetic_tree, tmp_path / "coco")
    path = os.path.join(root, "annotations", "instances_val2014.json")
    with open(path) as f:
        coco = json.load(f)
    coco["annotations"] = [a for a in coco["annotations"] if a["area"] < 40000]
    with open(path, "w") as f:
        json.dump(coco, f)
    with pytest.raises(DatasetError, match="instances_val2014.json has exactly one|no image of"):
        build_dataset(root, str(tmp_path / "out"), progress=False, figure=False)


def test_cli_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "Dataset.py"), "--coco_dir",
                        str(tmp_path / "nothing"), "--out_dir", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "COCO directory not found" in lines[0] and "Traceback" not in r.stderr


# -------------------------------------------------------------------- image decoding
def test_read_rgb_modes_and_no_exif_rotation(tmp_path):
    from PIL import Image
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:, :30] = (255, 0, 0)
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    Image.fromarray(rgb).convert("RGBA").save(tmp_path / "rgba.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.fromarray(rgb).save(tmp_path / "rot.jpg", exif=exif, quality=95)
    for name in ("cmyk.jpg", "pal.png", "rgba.png", "rot.jpg"):
        img = Dataset.read_rgb(str(tmp_path / name))
        assert img.shape == (40, 60, 3), name  # stored pixels, not the EXIF-rotated view
        assert img[20, 10, 0] > 200 and img[20, 10, 2] < 60, name  # red stays red (RGB order)
    assert Dataset.read_rgb(str(tmp_path / "absent.jpg")) is None


# ----------------------------------------------------------------------- MyCOCODataset
def test_mycocodataset_items(synthetic_data):
    out, summaries = synthetic_data
    ds = MyCOCODataset(out, train=False)
    assert isinstance(ds, torch.utils.data.Dataset) and not isinstance(ds, torch.nn.Module)
    assert len(ds) == summaries["test_data"]["kept"]
    with open(os.path.join(out, "test_data.pkl"), "rb") as f:
        records = pickle.load(f)
    for i in (0, len(ds) - 1):
        item = ds[i]
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, 256, 256)
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["image"].max() > 0.2
        assert item["label"].dtype == torch.long and item["label"].ndim == 0
        x, y, w, h = records[ds.files[i]]["bbox"]
        np.testing.assert_allclose(item["bbox"].numpy(),
                                   np.array([x, y, x + w, y + h]) / 256, rtol=1e-5)
        ref = cv2.cvtColor(cv2.imread(os.path.join(out, "test_data", ds.files[i])), cv2.COLOR_BGR2RGB)
        np.testing.assert_allclose(item["image"].permute(1, 2, 0).numpy(), ref / 255.0, atol=1e-6)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 256, 256) and batch["bbox"].shape == (4, 4)


def test_mycocodataset_missing_data(tmp_path):
    with pytest.raises(DatasetError, match="train_data.pkl not found"):
        MyCOCODataset(str(tmp_path), train=True)


def test_resize_averages_an_axis_that_shrinks_while_the_other_grows():
    """A 640x240 image of one-pixel vertical stripes: shrunk 2.5x across, grown down. Area
    averaging across gives an even grey; one bilinear pass would sample the stripes and
    alias them into bands of 0 and 255."""
    stripes = np.zeros((240, 640, 3), np.uint8)
    stripes[:, ::2] = 255
    out = Dataset.resize_image(stripes)
    assert out.shape == (256, 256, 3)
    assert abs(float(out.mean()) - 127.5) < 2 and float(out.std()) < 30
    aliased = cv2.resize(stripes, (256, 256), interpolation=cv2.INTER_LINEAR)
    assert float(aliased.std()) > 60  # what the one-pass resize gave
    tall = Dataset.resize_image(np.ascontiguousarray(stripes.transpose(1, 0, 2)))  # 240x640
    assert float(tall.std()) < 30
    gradient = np.tile(np.linspace(0, 255, 100, dtype=np.float32)[None, :, None], (100, 1, 3)).astype(np.uint8)
    grown = Dataset.resize_image(gradient)  # both axes grow: bilinear, smooth
    assert np.abs(np.diff(grown[0, :, 0].astype(int))).max() <= 2


def perfect_predictions(ds):
    """evaluation()'s per-image tensors for a model that is always right."""
    return {"label": ds.labels, "pred_label": ds.labels,
            "scores": torch.nn.functional.one_hot(ds.labels, 3).float(), "box": ds.boxes,
            "pred_box": ds.boxes, "iou": torch.ones(len(ds))}


def test_records_keep_the_original_geometry_and_coco_outputs_undo_the_resize(coco_mini_dir, mini_data):
    """On real COCO photos: each record keeps the image's size and the annotation's COCO box;
    a prediction equal to the 256-scaled ground truth comes back in COCO's pixels as the
    annotation's own box, and COCOeval scores such predictions AP 1 for every class the
    split has (None for one it has not)."""
    import utils
    out, _ = mini_data
    with open(os.path.join(coco_mini_dir, "annotations", "instances_val2017.json")) as f:
        coco = json.load(f)
    anns = {a["id"]: a for a in coco["annotations"]}
    sizes = {im["file_name"]: (im["width"], im["height"]) for im in coco["images"]}
    ds = MyCOCODataset(out, train=False)
    for f in ds.files:
        r = ds.data[f]
        assert (r["width"], r["height"]) == sizes[f] and r["coco_bbox"] == anns[r["id"]]["bbox"]
    predictions = utils.prediction_records(ds.files, ds.data, perfect_predictions(ds))
    detections = utils.coco_results(predictions, ds.data)
    for f, d in zip(ds.files, detections):
        assert d["bbox"] == pytest.approx(anns[ds.data[f]["id"]]["bbox"], abs=1e-3)
        assert d["category_id"] == ds.data[f]["category_id"] and d["score"] == 1.0
    metrics = utils.coco_metrics(utils.coco_ground_truth(ds.files, ds.data), detections)
    assert metrics["AP"] == pytest.approx(1.0) and metrics["AP50"] == pytest.approx(1.0)
    present = {Dataset.CLASS_NAMES[int(c)] for c in ds.labels}
    for name, per_class in metrics["per_class"].items():
        if name in present:
            assert per_class["AP"] == pytest.approx(1.0)
        else:
            assert per_class == {"AP": None, "AP50": None, "AP75": None}
    # Wrong classes, right boxes: nothing is detected.
    wrong = {**perfect_predictions(ds), "pred_label": (ds.labels + 1) % 3}
    missed = utils.coco_results(utils.prediction_records(ds.files, ds.data, wrong), ds.data)
    assert utils.coco_metrics(utils.coco_ground_truth(ds.files, ds.data), missed)["AP"] == 0.0


def test_the_validation_part_depends_on_the_files_and_fraction_alone():
    from Dataset import hold_out
    files = [f"COCO_train2014_{i:012d}.jpg" for i in range(40)]
    train, val = hold_out(files, 0.1)
    assert len(val) == 4 and sorted(train + val) == files and not set(train) & set(val)
    assert (train, val) == hold_out(list(files), 0.1) and train == sorted(train) and val == sorted(val)
    assert hold_out(files, 0.01)[1] and hold_out(files, 0.1, seed=1) != (train, val)
