"""Synthetic COCO-format data: the demo's and the tests' stand-in for COCO (synthetic/coco.py)."""
