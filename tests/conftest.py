"""Shared fixtures: the real COCO slice beside the checkout, and small synthetic trees."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COCO_MINI = os.path.join(os.path.dirname(ROOT), "shared", "coco_mini")


@pytest.fixture(scope="session")
def coco_mini_dir():
    if not os.path.isdir(os.path.join(COCO_MINI, "annotations")):
        pytest.skip("../shared/coco_mini is not beside the checkout")
    return COCO_MINI


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory):
    """A small synthetic COCO tree (2014 names), made once per test session."""
    from synthetic.coco import make_synthetic_coco
    root = str(tmp_path_factory.mktemp("synthetic_coco"))
    make_synthetic_coco(root, n_train=70, n_val=35, seed=3)
    return root


@pytest.fixture(scope="session")
def synthetic_data(synthetic_tree, tmp_path_factory):
    """The dataset built from synthetic_tree with two worker processes."""
    from Dataset import build_dataset
    out = str(tmp_path_factory.mktemp("synthetic_data"))
    summaries = build_dataset(synthetic_tree, out, year=2014, workers=2, progress=False)
    return out, summaries


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """About 14 train and 6 test images, for tests of the training machinery."""
    from Dataset import build_dataset
    from synthetic.coco import make_synthetic_coco
    root = tmp_path_factory.mktemp("tiny")
    make_synthetic_coco(str(root / "coco"), n_train=16, n_val=8, seed=1)
    build_dataset(str(root / "coco"), str(root / "data"), workers=1, progress=False, figure=False)
    return str(root / "data")


@pytest.fixture(scope="session")
def tiny_out(tmp_path_factory):
    """A tiny demo run of the whole experiment (2 epochs, a small HW5Net, on the CPU), for
    the tests that read an OUT: they copy it (tiny.linked_copy) before changing it."""
    import hw5_main
    from tiny import TINY_DEMO, hw5_args
    out = str(tmp_path_factory.mktemp("tiny_out") / "out")
    hw5_main.main(hw5_args("--out_dir", out, *TINY_DEMO, "--epochs", "2"))
    return out
