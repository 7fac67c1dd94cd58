"""Data for pretraining: tokenizer, packed token shards, resumable DP×CP-aware loading.

- `prepare`        text files → ``DIR`` (tokenizer.model, meta.json, train/ and val/ shards)
- `tokenizer`      SentencePiece wrapper, deterministic training, export to Hugging Face
- `shards`         the on-disk format; `PackedTokens` reads one split memory-mapped
- `sequences`      `SequenceDataset`: fixed-length samples with document ids
- `sampler`        `ResumableSampler`: per-epoch permutation, split over DP ranks, resumable
- `blend`          `BlendedDataset`: several datasets by weight
- `loader`         `build_train_loader` / `build_val_loader` (CP slicing, prefetch thread)
- `default_corpus` the embedded corpus (the interpreter's standard library), cached
                   (``python -m data_pipeline.default_corpus`` prepares it ahead of time)
- `synthetic`      Markov LM, MQAR and passkey datasets

See docs/data.md.
"""
