"""Local training on the device: model loading at the plan's precision, LoRA / zeroth-order
training under a memory guard (`session.LocalTrainer`)."""
