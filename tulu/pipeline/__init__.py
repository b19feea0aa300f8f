"""`tulu pipeline`: SFT -> DPO -> RLVR -> evaluation as chained jobs."""
