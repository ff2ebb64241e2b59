"""The data pipeline: shard reading and writing, decoding, preprocessing, tokenizers, BLIP text ids, region features."""
