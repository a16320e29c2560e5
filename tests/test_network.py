"""network.py: HW5Net's exact size and the report's layer table."""
import re

import pytest
import torch

from network import Block, HW5Net, count_parameters, model_summary

# The layer table of the report ("data.txt", Section 3.3), transcribed row for row.
REPORT_TABLE = """
ReflectionPad2d-1	[1, 3, 262, 262]	0	0
Conv2d-2	[1, 8, 256, 256]	1,184	1,184
BatchNorm2d-3	[1, 8, 256, 256]	16	16
ReLU-4	[1, 8, 256, 256]	0	0
Conv2d-5	[1, 16, 128, 128]	1,168	1,168
BatchNorm2d-6	[1, 16, 128, 128]	32	32
Conv2d-7	[1, 32, 64, 64]	4,640	4,640
BatchNorm2d-8	[1, 32, 64, 64]	64	64
Conv2d-9	[1, 64, 32, 32]	18,496	18,496
BatchNorm2d-10	[1, 64, 32, 32]	128	128
Conv2d-11	[1, 128, 16, 16]	73,856	73,856
BatchNorm2d-12	[1, 128, 16, 16]	256	256
Block-13	[1, 128, 16, 16]	295,680	295,680
Block-14	[1, 128, 16, 16]	295,680	295,680
Block-15	[1, 128, 16, 16]	295,680	295,680
Block-16	[1, 128, 16, 16]	295,680	295,680
Block-17	[1, 128, 16, 16]	295,680	295,680
Linear-18	[1, 1024]	33,555,456	33,555,456
BatchNorm1d-19	[1, 1024]	2,048	2,048
ReLU-20	[1, 1024]	0	0
Linear-21	[1, 64]	65,600	65,600
BatchNorm1d-22	[1, 64]	128	128
ReLU-23	[1, 64]	0	0
Linear-24	[1, 3]	195	195
Linear-25	[1, 5196]	170,267,724	170,267,724
BatchNorm1d-26	[1, 5196]	10,392	10,392
ReLU-27	[1, 5196]	0	0
Linear-28	[1, 1024]	5,321,728	5,321,728
BatchNorm1d-29	[1, 1024]	2,048	2,048
ReLU-30	[1, 1024]	0	0
Linear-31	[1, 256]	262,400	262,400
BatchNorm1d-32	[1, 256]	512	512
ReLU-33	[1, 256]	0	0
Linear-34	[1, 64]	16,448	16,448
BatchNorm1d-35	[1, 64]	128	128
ReLU-36	[1, 64]	0	0
Linear-37	[1, 4]	260	260
"""
ROW = re.compile(r"^\s*(\S+-\d+)\s+(\[[\d, ]+\])\s+([\d,]+)\s+([\d,]+)\s*$")


def parse_rows(text):
    return [ROW.match(line).groups() for line in text.splitlines() if ROW.match(line)]


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return HW5Net()


def test_exact_size(net):
    n_tensors, n_params = count_parameters(net)
    assert n_params == 211_083_307
    assert n_tensors == 88


def test_layer_table_equals_report(net):
    text = model_summary(net)
    table, hierarchy = text.split("Hierarchical Summary")
    expected = [tuple(line.split("\t")) for line in REPORT_TABLE.strip().splitlines()]
    assert parse_rows(table) == expected
    assert "Total params: 211,083,307" in table
    assert "bbox_head" in hierarchy
    assert net.training  # the summary does not leave the net in eval mode


def test_forward_shapes_and_no_relu_after_downsampling(net):
    logits, box = net(torch.rand(2, 3, 256, 256))
    assert logits.shape == (2, 3) and box.shape == (2, 4)
    kinds = [type(m).__name__ for m in net.model]
    # the printed network: ReLU only after the 7x7 stem, none after the stride-2 convs
    assert kinds[:4] == ["ReflectionPad2d", "Conv2d", "BatchNorm2d", "ReLU"]
    assert kinds[4:12] == ["Conv2d", "BatchNorm2d"] * 4 and kinds[12:] == ["Block"] * 5


def test_block_skip():
    torch.manual_seed(0)
    block = Block(4).eval()
    x = torch.randn(1, 4, 8, 8)
    torch.testing.assert_close(block(x), torch.relu(block.conv(x) + x))
    learnable = Block(4, learnable_res=True).eval()
    torch.testing.assert_close(learnable(x), torch.relu(learnable.conv(x) + learnable.res_conv(x)))
    extra = sum(p.numel() for p in learnable.parameters()) - sum(p.numel() for p in block.parameters())
    assert extra == 4 * 4 * 9 + 4 + 2 * 4  # conv3x3 with bias + BatchNorm


def test_build_model_takes_saved_settings_or_options():
    import argparse
    from network import ARCHITECTURE, build_model
    torch.manual_seed(0)
    from_dict = build_model({**ARCHITECTURE, "width": 2, "n_blocks": 1, "epochs": 3}, image_size=64)
    torch.manual_seed(0)
    from_options = build_model(argparse.Namespace(width=2, n_blocks=1, learnable_res=False, lr=1e-3), image_size=64)
    assert count_parameters(from_dict) == count_parameters(from_options)
    assert all(torch.equal(a, b) for a, b in zip(from_dict.state_dict().values(), from_options.state_dict().values()))
    assert from_dict(torch.zeros(2, 3, 64, 64))[1].shape == (2, 4)
    assert count_parameters(build_model(ARCHITECTURE)) == (88, 211_083_307)
