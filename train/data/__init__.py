"""The data pipeline: shard reading and writing, decoding, preprocessing, tokenizers."""
