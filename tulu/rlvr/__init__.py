"""RLVR across roles: the inference group generates, verifiers score, the training group learns,
and the new weights flow back to the inference group every step (`tulu.rlvr.loop`)."""
