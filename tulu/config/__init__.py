"""Layer 1, data only: what a job is. ``job`` (the YAML -> `JobConfig`, validated by key),
``schema`` (the key table `tulu config --keys` prints), ``shapes`` (model architectures by name
or by a local/hub model folder). Nothing here imports torch, Megatron or the launch layer."""
