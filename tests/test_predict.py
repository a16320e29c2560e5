"""predict.py: a saved model on real COCO photos, on any size and mode, and on bad input."""
import json
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import predict
from Dataset import resize_image
from utils import CLASS_NAMES
from network import HW5Net
from cli import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = {"width": 2, "n_blocks": 1, "learnable_res": False}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A small HW5Net's best_model.pt with the history.json that every run writes beside it."""
    run = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    torch.save(HW5Net(**SMALL).state_dict(), run / "best_model.pt")
    (run / "history.json").write_text(json.dumps({"settings": {**SMALL, "loss": "ciou"}}))
    return str(run / "best_model.pt")


def run_predict(*argv):
    return predict.main(predict.get_args_parser().parse_args([*argv, "--device", "cpu", "--quiet"]))


def cli(*argv):
    return subprocess.run([sys.executable, os.path.join(ROOT, "predict.py"), *argv, "--device", "cpu",
                           "--quiet"], capture_output=True, text=True, timeout=300)


def test_real_coco_photos(coco_mini_dir, weights, tmp_path):
    photos = os.path.join(coco_mini_dir, "val2017")
    out = str(tmp_path / "pred")
    records = run_predict("--weights", weights, "--out_dir", out, "--batch_size", "8", photos)
    names = sorted(f for f in os.listdir(photos) if f.endswith(".jpg"))
    assert [os.path.basename(r["file"]) for r in records] == names
    with open(os.path.join(out, "predictions.json")) as f:
        assert json.load(f) == json.loads(json.dumps(records))
    model = HW5Net(**SMALL)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    for r in records[:3]:
        img = cv2.cvtColor(cv2.imread(r["file"]), cv2.COLOR_BGR2RGB)
        h, w = img.shape[:2]
        with torch.no_grad():  # the model by hand, on the image resized as Dataset.py does
            logits, raw = model(torch.from_numpy(resize_image(img)).permute(2, 0, 1)[None].float() / 255)
        probs = logits.softmax(1)[0]
        assert r["scores"] == pytest.approx(dict(zip(CLASS_NAMES, probs.tolist())), abs=1e-5)
        assert r["class"] == CLASS_NAMES[int(probs.argmax())] and r["score"] == max(r["scores"].values())
        x1, y1, x2, y2 = r["bbox_xyxy"]
        assert 0 <= x1 <= x2 <= w and 0 <= y1 <= y2 <= h  # in the photo's pixels, inside it
        overlay = cv2.imread(os.path.join(out, r["overlay"]))
        assert overlay.shape == img.shape and not np.array_equal(overlay[..., ::-1], img)
    assert not [f for f in os.listdir(out) if ".tmp" in f]


def test_any_mode_size_and_exif_orientation_and_unique_overlay_names(weights, tmp_path, caplog):
    from PIL import Image
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    rgb = np.random.default_rng(0).integers(0, 255, (300, 500, 3), dtype=np.uint8)
    Image.fromarray(rgb).convert("L").save(a / "x.png")              # grayscale
    Image.fromarray(rgb).convert("RGBA").save(b / "x.png")           # RGBA, same name elsewhere
    Image.fromarray(rgb[:40, :900 // 3]).save(a / "x.jpg")           # the same stem, a JPEG
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 500 wide x 300 high; shown rotated: 300 wide x 500 high
    Image.fromarray(rgb).save(a / "rotated.jpg", exif=exif)
    (a / "broken.jpg").write_bytes(b"not an image")
    out = str(tmp_path / "pred")
    records = run_predict("--weights", weights, "--out_dir", out, str(a), str(b / "x.png"))
    assert "skipped" in caplog.text and "broken.jpg" in caplog.text  # one warning, the rest predicted
    by_name = {os.path.relpath(r["file"], tmp_path): r for r in records}
    assert sorted(by_name) == ["a/rotated.jpg", "a/x.jpg", "a/x.png", "b/x.png"]
    overlays = [r["overlay"] for r in records]
    assert len(set(overlays)) == 4 and sorted(os.listdir(out)) == sorted(overlays + ["predictions.json", ".overlays.json"])
    rotated = by_name["a/rotated.jpg"]
    assert cv2.imread(os.path.join(out, rotated["overlay"])).shape[:2] == (500, 300)
    x1, y1, x2, y2 = rotated["bbox_xyxy"]
    assert x2 <= 300 and y2 <= 500
    assert cv2.imread(os.path.join(out, by_name["a/x.jpg"]["overlay"])).shape[:2] == (40, 300)


@pytest.mark.slow
def test_bad_input_stops_with_one_line(weights, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    image = tmp_path / "one.png"
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    other = tmp_path / "other.pt"
    torch.save(HW5Net(width=4, n_blocks=1).state_dict(), other)
    cases = [
        (["--weights", weights, "--out_dir", str(tmp_path / "o1"), str(tmp_path / "empty")], "no .jpg, .jpeg or .png"),
        (["--weights", weights, "--out_dir", str(tmp_path / "o2"), str(tmp_path / "notes.txt")], "none of the 1 file"),
        (["--weights", str(tmp_path / "absent.pt"), "--out_dir", str(tmp_path / "o3"), str(image)], "no such file"),
        (["--weights", str(other), "--out_dir", str(tmp_path / "o4"), str(image)], "different architecture"),
        (["--weights", weights, "--out_dir", str(tmp_path / "o5"), str(tmp_path / "nowhere")], "no such file or directory"),
        (["--weights", weights, "--width", "8", "--out_dir", str(tmp_path / "o6"), str(image)], "contradicts"),
    ]
    for argv, message in cases:
        proc = cli(*argv)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")]
        assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], (argv, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert not os.path.exists(tmp_path / "o2")  # no folder left behind when nothing decodes


def test_without_history_the_architecture_comes_from_the_options(tmp_path):
    torch.save(HW5Net(width=4, n_blocks=2).state_dict(), tmp_path / "bare.pt")
    image = tmp_path / "one.png"
    cv2.imwrite(str(image), np.full((50, 80, 3), 128, np.uint8))
    records = run_predict("--weights", str(tmp_path / "bare.pt"), "--width", "4", "--n_blocks", "2",
                          "--out_dir", str(tmp_path / "pred"), str(image))
    assert len(records) == 1 and records[0]["file"] == str(image)
    with pytest.raises(UserError, match="different architecture"):
        run_predict("--weights", str(tmp_path / "bare.pt"), "--out_dir", str(tmp_path / "p2"), str(image))


def test_checkpoints_overlays_inside_an_input_folder_and_names_in_any_case(weights, tmp_path):
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    img = np.zeros((60, 80, 3), np.uint8)
    cv2.imwrite(str(photos / "a" / "Cat.jpg"), img)
    cv2.imwrite(str(photos / "b" / "cat.jpg"), img)
    out = str(photos / "pred")  # inside the folder given as input
    first = run_predict("--weights", weights, "--out_dir", out, str(photos))
    again = run_predict("--weights", weights, "--out_dir", out, str(photos))
    assert len(first) == len(again) == 2  # the overlays of the first run are not inputs
    assert {r["overlay"].lower() for r in again} == {"cat_jpg.png", "cat_jpg-2.png"}
    # A training checkpoint (kept with --keep_checkpoint) is read for its weights.
    ckpt = tmp_path / "run" / "checkpoint.pt"
    ckpt.parent.mkdir()
    torch.save({"model": torch.load(weights, weights_only=True), "optimizer": {}, "epoch": 1}, ckpt)
    (ckpt.parent / "history.json").write_text(json.dumps({"settings": SMALL}))
    from_ckpt = run_predict("--weights", str(ckpt), "--out_dir", str(tmp_path / "p2"), str(photos / "a"))
    # one image a batch against two: the sums run in another order (3e-8 apart on AVX-512)
    assert from_ckpt[0]["scores"] == pytest.approx(first[0]["scores"], rel=1e-5)
    proc = cli("--weights", weights, "--out_dir", str(photos / "a" / "Cat.jpg"), str(photos / "b"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Cat.jpg is a file, not a folder" in proc.stderr

    # Overlays written into the input folder itself, or by an earlier run into a folder the
    # search now meets, are not predicted as photos.
    same = str(photos / "b")
    assert len(run_predict("--weights", weights, "--out_dir", same, same)) == 1
    assert len(run_predict("--weights", weights, "--out_dir", same, same)) == 1
    run_predict("--weights", weights, "--out_dir", same, str(photos / "a"))  # overwrites b's predictions.json
    elsewhere = run_predict("--weights", weights, "--out_dir", str(tmp_path / "p3"), str(photos))
    assert sorted(r["file"] for r in elsewhere) == sorted([str(photos / "a" / "Cat.jpg"), str(photos / "b" / "cat.jpg")])
