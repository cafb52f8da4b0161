"""The paper's published numbers, as data (Ramachandran et al. 2019), for side-by-side reports.

Only what the paper prints; nothing here is derived. FLOPS in billions (2 per multiply-add),
params in millions, top-1 in %.
"""

from __future__ import annotations

# Table 1 — ImageNet. model preset -> (GFLOPS, params M, top-1 %)
TABLE1: dict[str, tuple[float, float, float]] = {
    "resnet26": (4.7, 13.7, 74.5),
    "sasa_resnet26_convstem": (4.5, 10.3, 75.8),
    "sasa_resnet26": (4.7, 10.3, 74.8),
    "resnet38": (6.5, 19.6, 76.2),
    "sasa_resnet38_convstem": (5.7, 14.1, 77.1),
    "sasa_resnet38": (6.0, 14.1, 76.9),
    "resnet50": (8.2, 25.6, 76.9),
    "sasa_resnet50_convstem": (7.0, 18.0, 77.4),
    "sasa_resnet50": (7.2, 18.0, 77.6),
}

# Tables 3-7 (ablations, ResNet-50, 224x224): (GFLOPS, params M or None where not printed, top-1 %).
Row = tuple[float, float | None, float]

# Table 3 — attention groups (the rest convolution) -> top-1 on the held-out 4% split (~3 pts above val).
TABLE3_STAGES: dict[str, Row] = {
    "1,2,3,4": (7.0, 18.0, 80.2),
    "2,3,4": (7.3, 18.1, 80.7),
    "3,4": (7.5, 18.5, 80.7),
    "4": (8.0, 20.8, 80.2),
    "none": (8.2, 25.6, 79.5),
    "1": (7.9, 25.5, 79.7),
    "1,2": (7.8, 25.0, 79.6),
    "1,2,3": (7.2, 22.7, 79.9),
}

# Table 4 — spatial extent k -> ImageNet val (params constant, 18.0 M).
TABLE4_K: dict[int, Row] = {
    3: (6.6, 18.0, 76.4), 5: (6.7, 18.0, 77.2), 7: (7.0, 18.0, 77.4), 9: (7.3, 18.0, 77.7), 11: (7.7, 18.0, 77.6),
}

# Table 5 — positional encoding -> held-out split.
TABLE5_POS: dict[str, Row] = {"none": (6.9, 18.0, 77.6), "absolute": (6.9, 18.0, 78.2), "relative": (7.0, 18.0, 80.2)}

# Table 6 — logit terms -> ImageNet val.
TABLE6_LOGITS: dict[str, Row] = {"qr": (6.1, 16.7, 76.9), "qk+qr": (7.0, 18.0, 77.4)}

# Table 7 — attention stem of the full-attention ResNet-50 -> ImageNet val (no params column).
TABLE7_STEM: dict[str, Row] = {
    "attention-plain": (7.1, None, 76.2),
    "attention-conv-values": (7.4, None, 77.2),
    "attention": (7.2, None, 77.6),
}

# Table 2 — COCO detection with RetinaNet. model preset -> (GFLOPS, params M, mAP_coco, mAP_50,
# mAP_75, mAP_s, mAP_m, mAP_l). The paper does not say at which input size it counted FLOPS;
# 640 x 640 reproduces the conv rows (see sasa_bench/models/detection.py).
TABLE2: dict[str, tuple[float, float, float, float, float, float, float, float]] = {
    "retinanet_resnet50": (182, 33.4, 36.5, 54.3, 39.0, 18.3, 40.6, 51.7),
    "retinanet_sasa_resnet50_convstem": (173, 25.9, 36.8, 54.6, 39.3, 18.4, 41.1, 51.7),
    "retinanet_sasa_resnet50": (173, 25.9, 36.2, 54.0, 38.7, 17.5, 40.3, 51.7),
    "retinanet_sasa_resnet50_convstem_attnfpn": (111, 22.0, 36.6, 54.3, 39.1, 19.0, 40.7, 51.1),
    "retinanet_sasa_resnet50_attnfpn": (110, 22.0, 36.6, 54.5, 39.2, 18.5, 40.6, 51.6),
}
TABLE2_METRICS = ("map", "map_50", "map_75", "map_s", "map_m", "map_l")  # the order of TABLE2[...][2:]
TABLE2_IMAGE_SIZE = 640
