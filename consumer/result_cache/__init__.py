"""The result cache: a repeated image is answered without running the model.

- `key.py`: the result key (image bytes, prompt, model, adapter, generation settings, dtype).
- `store.py`: the replica's in-memory copy, least recently used first out, within RESULT_CACHE_MAX_BYTES.
- `step.py`: infer's step before the model: hits answered, the rest generated (and cached).
- `topic.py`: RESULT_CACHE_TOPIC, the compacted topic the replicas share: created or checked at start,
  read to its end before the replica is ready, and followed while it runs.

Records publishes each new entry beside its result (consumer/stages/records.py). docs/result-cache.md
says how to size it and what invalidates an entry.
"""
