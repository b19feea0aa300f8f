"""SFT and DPO training on Megatron-core: the step loop a `train` job runs.

- ``schedule``: learning rate (linear warm-up, then linear/cosine decay to ``min_lr``, or constant).
- ``losses``: masked next-token cross entropy; DPO (length-normalised, as in Tülu 3, and plain);
  reward/margin/accuracy metrics. Pure tensor functions.
- ``batches``: loader batches -> Megatron micro-batches (next-token targets, masks).
- ``model``: build the policy (and the frozen reference) for this rank's TP/PP place, the DDP
  wrapper and Megatron's optimizer; weights from HF, or a seeded layout-independent init.
- ``step``: one optimizer step through Megatron's pipeline schedule; forward-only passes for
  evaluation and reference log-probs.
- ``objectives``: what SFT and DPO compute per micro-batch and report.
- ``metrics``: stdout, ``metrics.jsonl``, TensorBoard, the loss-curve plot.
- ``loop``: setup -> resume -> steps with checkpoints, evals and graceful stop -> final eval.

Submodules import Megatron: ``import tulu.train`` alone is cheap.
"""
