"""Layer 2, what a job needs, computed from its config before submission: ``layout`` (ranks ->
inference and training groups, TP/PP/DP, batch geometry, time-limit warning), ``memory``
(bytes per GPU and per node), ``run_space`` (disk for checkpoints and logs)."""
