"""The inference engine (in progress): continuous batching on a paged KV cache."""
