"""utils.py: IoU metric, box ordering, CIoU loss, evaluation, confusion matrix, figures."""
import math

import cv2
import pytest
import torch
from torch import nn

import utils
from utils import (CompleteIOULoss, box_iou_per_image, confusion_matrix, evaluation,
                   order_boxes)


def iou(p, t):
    return box_iou_per_image(torch.tensor([p], dtype=torch.float64),
                             torch.tensor([t], dtype=torch.float64))[0].item()


def test_iou_hand_computed():
    full = [0.0, 0.0, 1.0, 1.0]
    assert iou([0.2, 0.3, 0.6, 0.9], [0.2, 0.3, 0.6, 0.9]) == pytest.approx(1.0)
    assert iou([0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.9, 0.9]) == 0.0  # disjoint
    assert iou([0.25, 0.25, 0.75, 0.75], full) == pytest.approx(0.25)  # nested
    assert iou([0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.75, 0.75]) == pytest.approx(0.0625 / 0.4375)
    assert iou([0.6, 0.2, 0.4, 0.8], [0.4, 0.2, 0.6, 0.8]) == 0.0  # inverted prediction
    assert iou([0.2, 0.8, 0.6, 0.3], [0.2, 0.3, 0.6, 0.8]) == 0.0  # inverted in y
    assert iou([-0.5, 0.0, 0.5, 1.0], [0.0, 0.0, 0.5, 1.0]) == pytest.approx(1.0)  # clipped
    assert iou([1.2, 1.2, 1.5, 1.5], [0.5, 0.5, 1.0, 1.0]) == 0.0  # outside the image


def test_iou_vectorised_matches_torchvision_on_valid_boxes():
    from torchvision.ops import box_iou
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, 2, 2, generator=g).sort(dim=1).values, torch.rand(64, 2, 2, generator=g).sort(dim=1).values
    pred = a.permute(0, 2, 1).reshape(64, 4)[:, [0, 2, 1, 3]]
    target = b.permute(0, 2, 1).reshape(64, 4)[:, [0, 2, 1, 3]]
    torch.testing.assert_close(box_iou_per_image(pred, target), box_iou(pred, target).diagonal())


def test_order_boxes():
    b = torch.tensor([[0.6, 0.9, 0.1, 0.2], [0.1, 0.2, 0.6, 0.9]], requires_grad=True)
    out = order_boxes(b)
    torch.testing.assert_close(out, torch.tensor([[0.1, 0.2, 0.6, 0.9]] * 2))
    out[:, 0].sum().backward()  # x1 comes from x_b in the first box, x_a in the second
    torch.testing.assert_close(b.grad, torch.tensor([[0.0, 0, 1, 0], [1, 0, 0, 0]]))


def random_valid_boxes(n, gen):
    xy = torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.6
    wh = 0.05 + torch.rand(n, 2, generator=gen, dtype=torch.float64) * 0.35
    return torch.cat([xy, xy + wh], dim=1)


def ciou_reference(p, t, alpha=None):
    """Complete-IoU loss from its definition (Zheng et al. 2020), one formula per term.
    alpha, when given, is held fixed (the trade-off weight carries no gradient)."""
    px1, py1, px2, py2 = p.unbind(-1)
    tx1, ty1, tx2, ty2 = t.unbind(-1)
    inter = (torch.minimum(px2, tx2) - torch.maximum(px1, tx1)).clamp(min=0) * \
            (torch.minimum(py2, ty2) - torch.maximum(py1, ty1)).clamp(min=0)
    union = (px2 - px1) * (py2 - py1) + (tx2 - tx1) * (ty2 - ty1) - inter
    iou_ = inter / union
    centre_d2 = ((px1 + px2 - tx1 - tx2) / 2) ** 2 + ((py1 + py2 - ty1 - ty2) / 2) ** 2
    diag2 = (torch.maximum(px2, tx2) - torch.minimum(px1, tx1)) ** 2 + \
            (torch.maximum(py2, ty2) - torch.minimum(py1, ty1)) ** 2
    v = 4 / math.pi ** 2 * (torch.atan((tx2 - tx1) / (ty2 - ty1)) - torch.atan((px2 - px1) / (py2 - py1))) ** 2
    if alpha is None:
        alpha = v / (1 - iou_ + v)
    return 1 - iou_ + centre_d2 / diag2 + alpha * v, alpha


def test_ciou_matches_reference():
    g = torch.Generator().manual_seed(1)
    p, t = random_valid_boxes(200, g), random_valid_boxes(200, g)
    expected, _ = ciou_reference(p, t)
    torch.testing.assert_close(CompleteIOULoss("none")(p, t), expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(CompleteIOULoss("mean")(p, t), expected.mean(), rtol=1e-6, atol=1e-6)


def test_ciou_gradient_reaches_input_and_matches_finite_differences():
    g = torch.Generator().manual_seed(2)
    t = random_valid_boxes(6, g)
    p = random_valid_boxes(6, g)
    p[:3] = p[:3][:, [2, 3, 0, 1]]  # half of the predictions inverted: order_boxes must handle them
    p.requires_grad_(True)
    CompleteIOULoss("sum")(p, t).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    # Central differences of the definition, with alpha held at its value at p (as
    # torchvision's loss, which computes alpha without gradient).
    _, alpha = ciou_reference(order_boxes(p.detach()), t)
    h, numeric = 1e-6, torch.zeros_like(p)
    for i in range(p.shape[0]):
        for j in range(4):
            e = torch.zeros_like(p)
            e[i, j] = h
            up = ciou_reference(order_boxes(p.detach() + e), t, alpha)[0].sum()
            down = ciou_reference(order_boxes(p.detach() - e), t, alpha)[0].sum()
            numeric[i, j] = (up - down) / (2 * h)
    torch.testing.assert_close(p.grad, numeric, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-7), (torch.float64, 1e-15)])
def test_ciou_equals_torchvisions_on_ordinary_boxes(dtype, tol):
    """The report's loss: on boxes of positive width and height, ours is torchvision's
    complete_box_iou_loss, value and gradient, up to float rounding."""
    from torchvision.ops import complete_box_iou_loss as torchvision_ciou
    g = torch.Generator().manual_seed(5)
    p, t = random_valid_boxes(400, g).to(dtype), random_valid_boxes(400, g).to(dtype)
    p[:50] = t[:50]  # equal to the target
    p[50:100, 2:] = p[50:100, :2] + 1e-4  # tiny
    p.requires_grad_(True)
    ours = utils.complete_box_iou_loss(p, t, reduction="none")
    theirs = torchvision_ciou(p, t, reduction="none")
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, rtol=0, atol=tol)
    g_ours, = torch.autograd.grad(ours.sum(), p)
    g_theirs, = torch.autograd.grad(theirs.sum(), p)
    torch.testing.assert_close(g_ours, g_theirs, rtol=tol * 10, atol=tol * 10)


TARGET = [0.2, 0.3, 0.6, 0.8]
DEGENERATE = {
    "zero height": [0.1, 0.5, 0.7, 0.5],
    "zero width": [0.4, 0.1, 0.4, 0.9],
    "point": [0.3, 0.3, 0.3, 0.3],
    "all zeros": [0.0, 0.0, 0.0, 0.0],
    "equal to the target": TARGET,
    "outside the image": [1.5, 1.5, 2.0, 2.5],
    "inverted": [0.6, 0.8, 0.2, 0.3],
    "inverted, zero height": [0.7, 0.5, 0.1, 0.5],
    "tiny height": [0.1, 1e-25, 0.7, 3e-25],
    "tiny point": [1e-30, 1e-30, 2e-30, 2e-30],
}


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16 autocast"])
@pytest.mark.parametrize("case", DEGENERATE)
def test_ciou_and_its_gradient_are_finite_for_any_box(case, amp):
    """torchvision's loss gives a NaN gradient at zero height and a NaN loss at a point; a
    bfloat16 box head produces such boxes (y1 == y2) in about 1.5% of batches."""
    pred = torch.tensor([DEGENERATE[case]] * 2, dtype=torch.bfloat16 if amp else torch.float32)
    target = torch.tensor([TARGET, [0.0, 0.0, 1.0, 1.0]])
    for order in (True, False):
        p = pred.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            loss = CompleteIOULoss(order=order)(p, target)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(p.grad).all(), (case, order, loss, p.grad)


def test_ciou_at_zero_height_is_the_limit_of_thin_boxes():
    """The zero-height value is where the ordinary one goes as the height shrinks: no jump."""
    t = torch.tensor([TARGET], dtype=torch.float64)
    flat = utils.complete_box_iou_loss(torch.tensor([[0.1, 0.5, 0.7, 0.5]], dtype=torch.float64), t)
    thin = utils.complete_box_iou_loss(torch.tensor([[0.1, 0.5, 0.7, 0.5 + 1e-9]], dtype=torch.float64), t)
    assert float(flat) == pytest.approx(float(thin), abs=1e-7)
    assert 1.0 < float(flat) < 2.0


def test_confusion_matrix_counts():
    labels = torch.tensor([0, 0, 1, 2, 2, 2, 1])
    preds = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    expected = torch.tensor([[1, 1, 0], [0, 2, 0], [1, 0, 2]])
    torch.testing.assert_close(confusion_matrix(labels, preds), expected)


class EchoModel(nn.Module):
    """A stand-in network: logits and box are read off the first pixels of the image."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return x[:, 0, 0, :3] + self.dummy, x[:, 0, 1, :4]


def make_split(n, gen):
    items = []
    for i in range(n):
        img = torch.zeros(3, 4, 4)
        label = int(torch.randint(0, 3, (1,), generator=gen))
        pred_label = label if i % 3 else (label + 1) % 3
        img[0, 0, pred_label] = 1.0
        box = random_valid_boxes(1, gen)[0].float()
        pred = box + 0.01 * torch.randn(4, generator=gen)
        if i % 4 == 0:
            pred = pred[[2, 3, 0, 1]]  # inverted raw output
        img[0, 1, :4] = pred
        items.append({"image": img, "label": torch.tensor(label), "bbox": box})
    return items


@pytest.mark.parametrize("order", [True, False])
def test_evaluation_means_over_images_with_a_short_last_batch(order):
    gen = torch.Generator().manual_seed(3)
    items = make_split(9, gen)  # batches of 4, 4 and 1
    loader = torch.utils.data.DataLoader(items, batch_size=4)
    model = EchoModel().train()
    cm, res = evaluation(model, loader, nn.CrossEntropyLoss(), nn.MSELoss(), "cpu", order=order)
    assert model.training  # the caller's mode is restored
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([it["label"] for it in items])
    boxes = torch.stack([it["bbox"] for it in items])
    logits, raw = images[:, 0, 0, :3], images[:, 0, 1, :4]
    pred = order_boxes(raw) if order else raw
    per_image_iou = box_iou_per_image(pred, boxes)
    assert res["mean_iou"] == pytest.approx(per_image_iou.mean().item(), rel=1e-6)
    assert res["accuracy"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert res["cross_entropy"] == pytest.approx(
        nn.functional.cross_entropy(logits, labels).item(), rel=1e-5)
    assert res["box_loss"] == pytest.approx(nn.functional.mse_loss(pred, boxes).item(), rel=1e-5)
    assert res["inverted_fraction"] == pytest.approx(3 / 9)
    assert int(cm.sum()) == 9 and int(cm.trace()) == int((logits.argmax(1) == labels).sum())
    torch.testing.assert_close(res["predictions"]["iou"], per_image_iou)
    # A batch-mean of batch-means (the report's mIoU) would differ here:
    batch_means = torch.stack([per_image_iou[:4].mean(), per_image_iou[4:8].mean(), per_image_iou[8:].mean()])
    assert abs(batch_means.mean().item() - res["mean_iou"]) > 1e-4


def png_shape(path):
    img = cv2.imread(str(path))
    assert img is not None, f"{path} is not a readable PNG"
    return img.shape[:2]


def test_figures_write_pngs(tmp_path):
    gen = torch.Generator().manual_seed(4)
    n = 20
    labels = torch.arange(n) % 3
    box = random_valid_boxes(n, gen).float()
    preds = {"label": labels, "pred_label": torch.where(torch.arange(n) % 4 == 0, (labels + 1) % 3, labels),
             "box": box, "pred_box": (box + 0.05).clamp(0, 1), "iou": torch.rand(n, generator=gen)}
    images = (torch.rand(n, 3, 256, 256, generator=gen) * 255).to(torch.uint8)
    cm = confusion_matrix(preds["label"], preds["pred_label"])
    utils.plot_cm(cm, str(tmp_path / "cm.png"), "Fig. 17(a) (report): HW5Net, CIoU loss, test data", 0.8, 0.61)
    utils.display_preds(images, preds, str(tmp_path / "preds.png"), "CIoU model, test data")
    history = {s: {"cross_entropy": [1.0, 0.5, 0.3], "box_loss": [0.6, 0.4, 0.3],
                   "accuracy": [0.4, 0.7, 0.9], "mean_iou": [0.1, 0.3, 0.5]} for s in ("train", "test")}
    utils.plot_history(history, str(tmp_path / "curves.png"), "CIoU", "Fig. 20 (report): training curves")
    assert png_shape(tmp_path / "cm.png") == (480, 560)
    assert png_shape(tmp_path / "preds.png") == (960, 1350)
    assert png_shape(tmp_path / "curves.png") == (360, 1680)
    assert not list(tmp_path.glob("*.tmp*"))


def test_prediction_titles_stay_clear_of_the_row_above(tmp_path, monkeypatch):
    """Each panel's two-line title lies between its own image and the image above it."""
    gen = torch.Generator().manual_seed(5)
    n = 15
    labels = torch.arange(n) % 3
    box = random_valid_boxes(n, gen).float()
    preds = {"label": labels, "pred_label": labels, "box": box, "pred_box": box, "iou": torch.rand(n, generator=gen)}
    images = torch.zeros(n, 3, 256, 256, dtype=torch.uint8)
    gaps = []

    def measure(fig, out_path, dpi=100):
        fig.canvas.draw()  # as savefig does: equal aspect applied to each image's axes
        renderer = fig.canvas.get_renderer()
        axes = [ax for ax in fig.axes if ax.images]
        for ax in axes:
            title = ax.title.get_window_extent(renderer)
            image = ax.get_window_extent(renderer)  # the image's box (equal aspect)
            above = [a.get_window_extent(renderer) for a in axes
                     if a.get_window_extent(renderer).y0 > image.y1 and
                     abs(a.get_window_extent(renderer).x0 - image.x0) < 1]
            gaps.append(title.y0 - image.y1)  # display coordinates: y grows upwards
            if above:
                gaps.append(min(a.y0 for a in above) - title.y1)
    monkeypatch.setattr(utils, "save_figure", measure)
    utils.display_preds(images, preds, str(tmp_path / "preds.png"), "CIoU model, test data")
    assert len(gaps) == 15 + 10 and min(gaps) > 0


def test_prediction_records_round_trip_exactly_and_coco_results_clip_and_rescale():
    import json
    preds = {"label": torch.tensor([0, 1]), "pred_label": torch.tensor([0, 2]),
             "scores": torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]),
             "box": torch.rand(2, 4), "pred_box": torch.tensor([[0.1, 0.2, 0.5, 0.6], [-0.25, 0.5, 0.25, 1.5]]),
             "iou": torch.rand(2)}
    records = {"a.jpg": {"image_id": 1, "width": 640, "height": 480},
               "b.jpg": {"image_id": 2, "width": 320, "height": 512}}
    saved = json.loads(json.dumps(utils.prediction_records(["a.jpg", "b.jpg"], records, preds)))
    assert saved[1]["pred_box"] == [-64.0, 128.0, 64.0, 384.0]  # 256x256 pixels, not clipped
    assert saved[0]["file_name"] == "a.jpg" and saved[1]["image_id"] == 2 and saved[1]["pred_label"] == 2
    back = utils.predictions_from_records(saved)
    for k, v in preds.items():
        assert torch.equal(back[k], v), k  # exactly: figures drawn again are the same
    coco = utils.coco_results(saved, records)
    assert coco[0] == {"image_id": 1, "category_id": 6, "bbox": pytest.approx([64.0, 96.0, 256.0, 192.0]),
                       "score": pytest.approx(0.7)}
    # Clipped to the image as the IoU metric clips it, then in the image's own pixels.
    assert coco[1]["category_id"] == 59 and coco[1]["bbox"] == pytest.approx([0.0, 256.0, 80.0, 256.0])


def test_coco_metrics_per_class_and_a_class_the_split_lacks():
    records = {f"{i}.jpg": {"image_id": i, "id": 100 + i, "category_id": (6, 17)[i % 2], "width": 100,
                            "height": 100, "coco_bbox": [10.0, 10.0, 50.0, 50.0], "area": 2500.0}
               for i in range(4)}
    files = sorted(records)
    gt = utils.coco_ground_truth(files, records)
    right = [{"image_id": i, "category_id": (6, 17)[i % 2], "bbox": [10.0, 10.0, 50.0, 50.0], "score": 0.9}
             for i in range(4)]
    shifted = [{**d, "bbox": [35.0, 10.0, 50.0, 50.0]} if d["category_id"] == 17 else d for d in right]
    m = utils.coco_metrics(gt, shifted)  # cats' boxes at IoU 1/3: missed at every threshold
    assert m["per_class"]["bus"] == {"AP": pytest.approx(1.0), "AP50": pytest.approx(1.0), "AP75": pytest.approx(1.0)}
    assert m["per_class"]["cat"]["AP"] == 0.0 and m["per_class"]["pizza"]["AP"] is None
    assert m["AP"] == pytest.approx(0.5)  # the mean over the classes the split has


def test_mean_box_baseline():
    train_boxes = torch.tensor([[0.0, 0.0, 0.4, 0.5], [0.0, 0.0, 0.6, 0.5]])  # mean [0, 0, .5, .5]
    test_boxes = torch.tensor([[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 1.0]])
    assert utils.mean_box_baseline(train_boxes, test_boxes) == pytest.approx((1 + 0 + 0.5) / 3)
