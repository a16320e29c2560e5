"""How far a model's predictions move when it is evaluated again another way: the basis of
grading.TOLERANCES, for `hw5_main.py --check` (docs/grading.md).

    python benchmarks/check_tolerances.py --out_dir OUT      # a finished hw5_main.py run

For each model of OUT and each split, the float32 evaluation at batch 64 (what --check
does) against: batch 7 (another order of the sums); TF32 emulated on the CPU (the inputs
and weights of every convolution and linear layer rounded to TF32's 10-bit mantissa, as
CUDA's TF32 kernels round them); and bfloat16 autocast (--amp) at batch 64 and 7. Prints
the largest box-coordinate difference in pixels, the images whose class changed, and the
largest top-two probability margin among them.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from checkpoints import load_checkpoint  # noqa: E402
from cli import HelpFormatter  # noqa: E402
from Dataset import MyCOCODataset  # noqa: E402
from devices import DeviceBatches  # noqa: E402
from network import build_model  # noqa: E402
from outputs import read_json  # noqa: E402
from utils import IMAGE_SIZE, evaluation  # noqa: E402

CPU = torch.device("cpu")


def tf32(t):
    """t rounded to TF32 (8-bit exponent, 10-bit mantissa), to nearest."""
    bits = t.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def as_tf32(model):
    """model with every convolution and linear layer computing on TF32-rounded inputs and weights."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            m.weight.data = tf32(m.weight.data)
            m.register_forward_pre_hook(lambda module, args: (tf32(args[0]),))
    return model


def predict(model, dataset, batch_size, amp=False, order=True):
    p = evaluation(model, DeviceBatches(dataset, batch_size, CPU), torch.nn.CrossEntropyLoss(),
                   lambda a, b: a.new_zeros(()), CPU, order=order, amp=amp)[1]["predictions"]
    return p["scores"], p["pred_box"] * IMAGE_SIZE


def compare(name, reference, other):
    (scores, boxes), (scores2, boxes2) = reference, other
    pixels = (boxes - boxes2).abs().amax(1)
    probabilities = (scores - scores2).abs().amax(1)
    flipped = scores.argmax(1) != scores2.argmax(1)
    top2 = scores.topk(2, dim=1).values
    margin = (top2[:, 0] - top2[:, 1])[flipped]
    print(f"  {name:24s} largest box difference {pixels.max():.4f} px (99.9th percentile "
          f"{pixels.quantile(0.999):.4f}), largest probability difference {probabilities.max():.2e}; "
          f"{int(flipped.sum())} class(es) changed"
          + (f", largest top-two margin among them {margin.max():.2e}" if flipped.any() else ""))


def get_args_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--out_dir", required=True, help="a finished hw5_main.py run, its DATA in place (required)")
    p.add_argument("--data_dir", help="its DATA, when not where the run's settings say")
    return p


def main(args):
    torch.set_grad_enabled(False)
    for key in ("ciou", "mse"):
        settings = read_json(os.path.join(args.out_dir, key, "history.json"), "a run's history")["settings"]
        data_dir = args.data_dir or settings["data_dir"]
        order = not settings["raw_boxes"]
        state = load_checkpoint(os.path.join(args.out_dir, key, "best_model.pt"))
        for split in ("train", "test"):
            dataset = MyCOCODataset(data_dir, train=split == "train")
            model = build_model(settings)
            model.load_state_dict(state)
            print(f"{key} model, {split} ({len(dataset)} images):")
            reference = predict(model, dataset, 64, order=order)
            compare("float32, batch 7", reference, predict(model, dataset, 7, order=order))
            bf16 = predict(model, dataset, 64, amp=True, order=order)
            compare("bfloat16 autocast", reference, bf16)
            compare("bfloat16, batch 7 vs 64", bf16, predict(model, dataset, 7, amp=True, order=order))
            compare("TF32, emulated", reference, predict(as_tf32(model), dataset, 64, order=order))


if __name__ == "__main__":
    main(get_args_parser().parse_args())
