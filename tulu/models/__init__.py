"""Models: Llama as a Megatron-core GPTModel, HF <-> Megatron weight conversion, CPU support.

- ``tulu.models.presets``: Llama 3.1 shapes (pure data, cheap to import).
- ``tulu.models.llama``: build the local shard of a Megatron ``GPTModel`` from a ``LlamaConfig``.
- ``tulu.models.convert``: HF <-> Megatron weights for any TP/PP split, and a per-tensor stream.
- ``tulu.models.megatron_cpu``: the CUDA -> CPU redirects megatron-core needs on a CPU torch.
- ``tulu.models.attention``: torch-SDPA core attention for Megatron's local layer spec.

Submodules are not imported here: importing megatron-core takes seconds.
"""
