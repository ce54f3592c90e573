"""Preprocessing: sources -> normalised conversations -> resized images -> pre-tokenised samples ->
atomic WebDataset shards with an index. Imports neither deepspeed nor torch.distributed."""
