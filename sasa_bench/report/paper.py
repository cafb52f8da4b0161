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

# Table 3 — conv groups / attention groups -> top-1 on the held-out 4% split (~3 pts above val).
TABLE3_STAGES: dict[str, float] = {
    "1,2,3,4": 80.2,
    "2,3,4": 80.7,
    "3,4": 80.7,
    "4": 80.2,
    "none": 79.5,
    "1": 79.7,
    "1,2": 79.6,
    "1,2,3": 79.9,
}  # keys: the attention groups

# Table 4 — spatial extent k -> ImageNet val top-1.
TABLE4_K: dict[int, float] = {3: 76.4, 5: 77.2, 7: 77.4, 9: 77.7, 11: 77.6}

# Table 5 — positional encoding -> held-out split top-1.
TABLE5_POS: dict[str, float] = {"none": 77.6, "absolute": 78.2, "relative": 80.2}

# Table 6 — logit terms -> ImageNet val top-1.
TABLE6_LOGITS: dict[str, float] = {"qr": 76.9, "qk+qr": 77.4}

# Table 7 — attention stem of the full-attention ResNet-50 -> ImageNet val top-1.
TABLE7_STEM: dict[str, float] = {
    "attention-plain": 76.2,
    "attention-conv-values": 77.2,
    "attention": 77.6,
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
