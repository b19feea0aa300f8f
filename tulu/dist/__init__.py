"""Layer 4, processes talking to each other: ``groups`` (each role's world, Megatron's groups,
the bridge between trainers and engines) and ``weight_sync`` (trained weights -> engines,
streamed in buckets and routed by what each engine rank holds)."""
