"""Evaluation: post-processing (NMS), jitted inference, COCO evaluation, the evaluator."""
