"""What every Megatron format shares: what a checkpoint records beyond the model and the target of a
conversion (checkpoint.py), Megatron-LM's `args` (args.py), name spellings (names.py), torch_dist /
zarr keys (keys.py), the tracker (tracker.py), writing (write.py) and planning a target's files
(files.py)."""
