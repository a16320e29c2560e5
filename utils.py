"""Box decoding, the IoU metric, the CIoU loss, evaluation and the report's figures.

Boxes are [x1, y1, x2, y2] normalised to (0, 1) throughout. Figures take saved results
(confusion matrices, per-image predictions, histories), so they can be redrawn without
running a model again.
"""
import contextlib
import io
import math

import cv2
import numpy as np
import torch
from torch import nn

from devices import accumulator_dtype, autocast
from outputs import atomic_write

IMAGE_SIZE = 256  # the network's input, and the dataset's images: IMAGE_SIZE x IMAGE_SIZE
CLASS_NAMES = ("bus", "cat", "pizza")
COCO_IDS = (6, 17, 59)  # sorted COCO ids -> class indices 0, 1, 2

GREEN, RED, BLUE = (0, 255, 0), (255, 0, 0), (0, 90, 255)  # RGB: ground truth, CIoU (a prediction), MSE


# ---------------------------------------------------------------------------------
# Boxes, metric and loss
# ---------------------------------------------------------------------------------
def order_boxes(b):
    """Each coordinate pair ordered (min, max): CIoU is defined only for x1 < x2, y1 < y2,
    and fed the head's raw output, training drifts into inverted boxes."""
    x_a, y_a, x_b, y_b = b.unbind(-1)
    return torch.stack([torch.minimum(x_a, x_b), torch.minimum(y_a, y_b),
                        torch.maximum(x_a, x_b), torch.maximum(y_a, y_b)], dim=-1)


def box_iou_per_image(pred, target):
    """IoU of each predicted box, clipped to the image, with its ground truth, Tensor[N];
    an inverted box has zero area and so IoU 0."""
    pred = pred.clamp(0.0, 1.0)
    pw = (pred[:, 2] - pred[:, 0]).clamp(min=0)
    ph = (pred[:, 3] - pred[:, 1]).clamp(min=0)
    tw = (target[:, 2] - target[:, 0]).clamp(min=0)
    th = (target[:, 3] - target[:, 1]).clamp(min=0)
    iw = (torch.minimum(pred[:, 2], target[:, 2]) - torch.maximum(pred[:, 0], target[:, 0])).clamp(min=0)
    ih = (torch.minimum(pred[:, 3], target[:, 3]) - torch.maximum(pred[:, 1], target[:, 1])).clamp(min=0)
    inter = iw * ih
    union = pw * ph + tw * th - inter
    return torch.where(union > 0, inter / union.clamp(min=1e-12), torch.zeros_like(union))


def mean_box_baseline(train_boxes, boxes):
    """Mean IoU of one box for every image, the training set's mean box: what a model scores
    that learned nothing about where the object is."""
    mean_box = train_boxes.float().mean(0, keepdim=True).expand_as(boxes)
    return float(box_iou_per_image(mean_box, boxes.float()).mean())


def inverted_fraction(pred):
    """Fraction of boxes with x2 < x1 or y2 < y1 (0-dim tensor)."""
    return ((pred[:, 2] < pred[:, 0]) | (pred[:, 3] < pred[:, 1])).float().mean()


def aspect_angle(w, h):
    """CIoU's angle atan(w / h) as atan2, finite with its gradient at h = 0 (bfloat16 ties
    y1 and y2 often); a point gets a square's angle and no gradient. The sign of h is
    carried so that inverted raw boxes keep atan(w / h)'s value."""
    sign = 1 - 2 * (h < 0).to(h.dtype)
    a, b = w * sign, h * sign
    point = a * a + b * b < torch.finfo(a.dtype).tiny
    return torch.atan2(a.masked_fill(point, 1.0), b.masked_fill(point, 1.0))


def complete_box_iou_loss(pred, target, reduction="mean", eps=1e-7):
    """Complete-IoU loss (Zheng et al. 2020), torchvision's complete_box_iou_loss term for
    term, with aspect_angle (finite for every box the head can produce) and a clamped
    intersection (a boolean-mask assignment waits for the GPU). At least float32: the
    small terms round away in bfloat16."""
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    x1, y1, x2, y2 = pred.to(dtype).unbind(-1)
    x1g, y1g, x2g, y2g = target.to(dtype).unbind(-1)
    inter = ((torch.minimum(x2, x2g) - torch.maximum(x1, x1g)).clamp(min=0)
             * (torch.minimum(y2, y2g) - torch.maximum(y1, y1g)).clamp(min=0))
    w, h, w_gt, h_gt = x2 - x1, y2 - y1, x2g - x1g, y2g - y1g
    iou = inter / (w * h + w_gt * h_gt - inter + eps)
    # Distance term: centres' squared distance over the enclosing box's squared diagonal.
    diagonal2 = ((torch.maximum(x2, x2g) - torch.minimum(x1, x1g)) ** 2
                 + (torch.maximum(y2, y2g) - torch.minimum(y1, y1g)) ** 2 + eps)
    centres2 = ((x2 + x1) / 2 - (x1g + x2g) / 2) ** 2 + ((y2 + y1) / 2 - (y1g + y2g) / 2) ** 2
    v = (4 / math.pi ** 2) * (aspect_angle(w_gt, h_gt) - aspect_angle(w, h)) ** 2
    with torch.no_grad():  # the trade-off weight carries no gradient, as in torchvision
        alpha = v / (1 - iou + v + eps)
    loss = 1 - iou + centres2 / diagonal2 + alpha * v
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean() if loss.numel() > 0 else 0.0 * loss.sum()
    raise ValueError(f"reduction must be 'none', 'mean' or 'sum', not {reduction!r}")


class CompleteIOULoss(nn.Module):
    """The CIoU box loss (complete_box_iou_loss), with the prediction's coordinate pairs
    ordered first (order=False feeds it raw, as the report's code)."""

    def __init__(self, reduction="mean", order=True):
        super().__init__()
        self.reduction = reduction
        self.order = order

    def forward(self, output, target):
        if self.order:
            output = order_boxes(output)
        return complete_box_iou_loss(output, target, reduction=self.reduction)


def confusion_matrix(labels, preds, n_classes=len(CLASS_NAMES)):
    """[n, n] counts, rows true class, columns predicted class."""
    idx = labels.to(torch.long) * n_classes + preds.to(torch.long)
    return torch.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


# ---------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------
def evaluation(model, loader, criterion_cls, criterion_box, device, order=True, amp=False):
    """The model over a whole split, in eval mode under torch.no_grad(). Returns
    (confusion matrix [3, 3], results): cross_entropy, box_loss, accuracy, mean_iou and
    inverted_fraction (of the raw boxes), each a mean over images (the criteria's batch
    means are weighted by the batch's size), n_images, and predictions: per-image CPU
    tensors label, pred_label, scores (softmax), box, pred_box (ordered unless order is
    False, as the report's code) and iou."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, device=device, dtype=accumulator_dtype(device))  # ce, box loss, inverted
    parts = {k: [] for k in ("label", "pred_label", "scores", "box", "pred_box", "iou")}
    n = 0
    # Channels-last input: oneDNN's convolutions run faster on the CPU (same results up to
    # float rounding); on a GPU, the layout training uses.
    memory_format = torch.channels_last if device.type == "cpu" else torch.contiguous_format
    with torch.no_grad():
        for batch in loader:
            images = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
            labels = batch["label"].to(device, non_blocking=True)
            boxes = batch["bbox"].to(device, non_blocking=True)
            with autocast(device, amp):
                logits, raw_boxes = model(images)
            logits, raw_boxes = logits.float(), raw_boxes.float()
            bs = labels.shape[0]
            pred_box = order_boxes(raw_boxes) if order else raw_boxes
            sums += torch.stack([criterion_cls(logits, labels), criterion_box(pred_box, boxes),
                                 inverted_fraction(raw_boxes)]).to(sums.dtype) * bs
            parts["label"].append(labels)
            parts["pred_label"].append(logits.argmax(1))
            parts["scores"].append(logits.softmax(1))
            parts["box"].append(boxes)
            parts["pred_box"].append(pred_box)
            parts["iou"].append(box_iou_per_image(pred_box, boxes))
            n += bs
    model.train(was_training)
    preds = {k: torch.cat(v).cpu() for k, v in parts.items()}  # one device->host copy
    sums = (sums / n).tolist()
    cm = confusion_matrix(preds["label"], preds["pred_label"])
    results = {
        "cross_entropy": sums[0],
        "box_loss": sums[1],
        "accuracy": int((preds["label"] == preds["pred_label"]).sum()) / n,
        "mean_iou": float(preds["iou"].numpy().mean(dtype=np.float64)),
        "inverted_fraction": sums[2],
        "n_images": n,
        "predictions": preds,
    }
    return cm, results


# ---------------------------------------------------------------------------------
# Predictions on disk, and COCO's detection metrics
# ---------------------------------------------------------------------------------
def prediction_records(files, records, predictions):
    """A JSON-ready record per image: {"file_name", "image_id", "label", "pred_label",
    "scores", "box", "pred_box", "iou"}, boxes in the 256x256 image's pixels (x 256 is
    exact in float32, so figures drawn from the records again are the same figures)."""
    columns = {k: predictions[k].tolist() for k in ("label", "pred_label", "scores", "iou")}
    boxes = {k: (predictions[k] * IMAGE_SIZE).tolist() for k in ("box", "pred_box")}
    return [{"file_name": f, "image_id": records[f]["image_id"], "label": columns["label"][i],
             "pred_label": columns["pred_label"][i], "scores": columns["scores"][i],
             "box": boxes["box"][i], "pred_box": boxes["pred_box"][i], "iou": columns["iou"][i]}
            for i, f in enumerate(files)]


def predictions_from_records(prediction_list):
    """The per-image tensors of evaluation() back from prediction_records()."""
    def column(key, dtype):
        return torch.tensor([r[key] for r in prediction_list], dtype=dtype)
    return {"label": column("label", torch.long), "pred_label": column("pred_label", torch.long),
            "scores": column("scores", torch.float32),
            "box": column("box", torch.float32) / IMAGE_SIZE,
            "pred_box": column("pred_box", torch.float32) / IMAGE_SIZE,
            "iou": column("iou", torch.float32)}


def coco_results(prediction_list, records):
    """The predictions in COCO's results format (COCO.loadRes): {"image_id", "category_id",
    "bbox": [x, y, w, h] clipped to the image, in the original image's pixels, "score":
    the predicted class's probability}."""
    out = []
    for r in prediction_list:
        rec = records[r["file_name"]]
        sx, sy = rec["width"] / IMAGE_SIZE, rec["height"] / IMAGE_SIZE
        x1, y1, x2, y2 = (min(max(v, 0.0), IMAGE_SIZE) for v in r["pred_box"])
        out.append({"image_id": r["image_id"], "category_id": COCO_IDS[r["pred_label"]],
                    "bbox": [x1 * sx, y1 * sy, max(x2 - x1, 0.0) * sx, max(y2 - y1, 0.0) * sy],
                    "score": r["scores"][r["pred_label"]]})
    return out


def coco_ground_truth(files, records):
    """A pycocotools COCO of a split's ground truth: each kept image with its one dominant
    annotation, in the original image's pixels."""
    from pycocotools.coco import COCO
    gt = COCO()
    gt.dataset = {
        "images": [{"id": records[f]["image_id"], "file_name": f, "width": records[f]["width"],
                    "height": records[f]["height"]} for f in files],
        "annotations": [{"id": records[f]["id"], "image_id": records[f]["image_id"],
                         "category_id": records[f]["category_id"], "bbox": records[f]["coco_bbox"],
                         "area": records[f]["area"], "iscrowd": 0} for f in files],
        "categories": [{"id": cid, "name": name} for cid, name in zip(COCO_IDS, CLASS_NAMES)],
    }
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt.createIndex()
    return gt


def coco_metrics(gt, results):
    """COCOeval (iouType "bbox") of results against gt: {"AP" (AP@[.5:.95]), "AP50",
    "AP75", "per_class": {"bus": {...}, "cat": {...}, "pizza": {...}}}, fractions; None
    where COCOeval has nothing to score (-1: a class the split does not have)."""
    from pycocotools.cocoeval import COCOeval

    def evaluate(category_ids=None):
        ev = COCOeval(gt, detections, "bbox")
        if category_ids is not None:
            ev.params.catIds = category_ids
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return {k: (float(v) if v >= 0 else None) for k, v in zip(("AP", "AP50", "AP75"), ev.stats[:3])}

    with contextlib.redirect_stdout(io.StringIO()):
        detections = gt.loadRes(results)
        metrics = evaluate()
        metrics["per_class"] = {name: evaluate([cid]) for cid, name in zip(COCO_IDS, CLASS_NAMES)}
    return metrics


# ---------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot drawing to files only (no window, also on a machine with a display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out_path, dpi=100):
    """A matplotlib figure to a PNG, atomically, and closed."""
    atomic_write(out_path, lambda tmp: fig.savefig(tmp, dpi=dpi, format="png"))
    pyplot().close(fig)


def draw_box(img, box_xyxy, colour, text, thickness=2, label_at="top", font_scale=0.45):
    """Draw a box and its label on an RGB uint8 image in place (cv2, as the report), the
    label on a tab above the box (label_at="top") or below it, kept inside the image."""
    x1, y1, x2, y2 = (int(round(v)) for v in box_xyxy)
    cv2.rectangle(img, (x1, y1), (x2, y2), colour, thickness)
    weight = max(1, round(font_scale / 0.45))
    (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, weight)
    tab_h = th + base + 3
    if label_at == "top":
        top = y1 - tab_h if y1 - tab_h >= 0 else y1
    else:
        top = y2 if y2 + tab_h <= img.shape[0] else y2 - tab_h
    top = min(max(top, 0), img.shape[0] - tab_h)
    left = min(max(x1, 0), max(img.shape[1] - tw - 4, 0))
    cv2.rectangle(img, (left, top), (left + tw + 4, top + tab_h), colour, -1)
    cv2.putText(img, text, (left + 2, top + th + 1), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0),
                weight, cv2.LINE_AA)
    return img


def plot_cm(cm, out_path, title, accuracy, mean_iou):
    """Report Figs. 14 and 17: confusion-matrix heatmap with accuracy and mean IoU."""
    import seaborn as sns
    plt = pyplot()
    cm = np.asarray(cm)
    fig, ax = plt.subplots(figsize=(5.6, 4.8))
    sns.heatmap(cm, annot=True, fmt="d", cmap="Blues", cbar=True, square=True, ax=ax,
                xticklabels=CLASS_NAMES, yticklabels=CLASS_NAMES, annot_kws={"fontsize": 12})
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(f"{title}\naccuracy {100 * accuracy:.1f}%, mean IoU {mean_iou:.3f}", fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_path)


def select_per_class(labels, per_class=5, seed=0):
    """Indices of up to per_class examples of each class, chosen with a fixed seed."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    chosen = []
    for c in range(len(CLASS_NAMES)):
        idx = np.flatnonzero(labels == c)
        chosen.append(sorted(rng.choice(idx, size=min(per_class, len(idx)), replace=False).tolist()))
    return chosen


def display_preds(images, predictions, out_path, title, per_class=5, seed=0):
    """Report Figs. 15, 16, 18, 19: a row per class of per_class images, ground truth in
    green and prediction in red, each box labelled with its own class; the panel title
    says whether the class was right and gives the IoU.

    images: uint8 [N, 3, 256, 256] (e.g. MyCOCODataset.images); predictions: the
    per-image tensors of evaluation()."""
    plt = pyplot()
    rows = select_per_class(predictions["label"], per_class, seed)
    fig, axes = plt.subplots(len(CLASS_NAMES), per_class,
                             figsize=(2.7 * per_class, 3.2 * len(CLASS_NAMES)), squeeze=False)
    for r, indices in enumerate(rows):
        for c in range(per_class):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(indices):
                continue
            i = indices[c]
            img = np.ascontiguousarray(images[i].permute(1, 2, 0).numpy())
            true_label = int(predictions["label"][i])
            pred_label = int(predictions["pred_label"][i])
            draw_box(img, (predictions["box"][i] * IMAGE_SIZE).tolist(), GREEN, CLASS_NAMES[true_label])
            draw_box(img, (predictions["pred_box"][i].clamp(0, 1) * IMAGE_SIZE).tolist(), RED,
                     CLASS_NAMES[pred_label], label_at="bottom")
            ax.imshow(img)
            ax.set_title(f"{CLASS_NAMES[true_label]} {c + 1}\nClassification: "
                         f"{true_label == pred_label}, IoU: {float(predictions['iou'][i]):.2f}",
                         fontsize=9)
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    save_figure(fig, out_path)


def display_comparison(images, ciou, mse, out_path, title, per_class=5, seed=0, n_largest=3):
    """Report Section 4.2, image by image: the images display_preds chooses, with the
    ground truth (green) and the CIoU (red) and MSE (blue) models' boxes, each model's IoU
    in the title; below, the two models' IoUs image by image, and the n_largest images
    where they differ most. ciou, mse: per-image tensors of evaluation() on one split."""
    plt = pyplot()
    rows = select_per_class(ciou["label"], per_class, seed)
    diff = mse["iou"] - ciou["iou"]
    rows.append(diff.abs().argsort(descending=True)[:n_largest].tolist())
    fig, axes = plt.subplots(len(rows), per_class, figsize=(2.7 * per_class, 3.2 * len(rows)), squeeze=False)
    for r, indices in enumerate(rows):
        offset = per_class - n_largest if r == len(rows) - 1 else 0
        for c in range(per_class):
            axes[r, c].axis("off")
        for c, i in enumerate(indices):
            img = np.ascontiguousarray(images[i].permute(1, 2, 0).numpy())
            draw_box(img, (ciou["box"][i] * IMAGE_SIZE).tolist(), GREEN, CLASS_NAMES[int(ciou["label"][i])])
            for preds, colour, at in ((ciou, RED, "bottom"), (mse, BLUE, "top")):
                draw_box(img, (preds["pred_box"][i].clamp(0, 1) * IMAGE_SIZE).tolist(), colour,
                         CLASS_NAMES[int(preds["pred_label"][i])], label_at=at)
            ax = axes[r, c + offset]
            ax.imshow(img)
            what = f"{CLASS_NAMES[int(ciou['label'][i])]} {c + 1}" if offset == 0 else f"MSE - CIoU {diff[i]:+.2f}"
            ax.set_title(f"{what}\nIoU CIoU {float(ciou['iou'][i]):.2f}, MSE {float(mse['iou'][i]):.2f}",
                         fontsize=9)
    ax = axes[-1, 0]
    ax.axis("on")
    ax.scatter(ciou["iou"], mse["iou"], s=4, alpha=0.5)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8)
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="CIoU model's IoU", ylabel="MSE model's IoU",
           title=f"MSE better on {int((diff > 0).sum())}, CIoU on {int((diff < 0).sum())}")
    ax = axes[-1, 1]
    ax.axis("on")
    ax.hist(diff.numpy(), bins=30, range=(-1, 1))
    ax.set(xlabel="IoU, MSE - CIoU", title=f"mean difference {float(diff.double().mean()):+.3f}")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    save_figure(fig, out_path)


def plot_history(history, out_path, loss_name, title):
    """Report Fig. 20: cross-entropy, box loss, accuracy and mean IoU per epoch, train
    and test. history = {"train": {metric: [per epoch]}, "test": {...}}."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator
    metrics = (("cross_entropy", "cross-entropy"), ("box_loss", f"{loss_name} box loss"),
               ("accuracy", "accuracy"), ("mean_iou", "mean IoU"))
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for ax, (key, label) in zip(axes, metrics):
        for split, style in (("train", "-o"), ("test", "-s")):
            values = history.get(split, {}).get(key, [])
            if values:
                ax.plot(range(1, len(values) + 1), values, style, markersize=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    save_figure(fig, out_path)
