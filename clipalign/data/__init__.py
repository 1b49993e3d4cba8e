"""Data: WebDataset shard pipelines, transforms, shard writing and synthetic data."""
