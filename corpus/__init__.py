"""A corpus of real architectures the project did not write (transformers' BERT, Whisper, ConvNeXt,
..., torch's GRU/LSTM and a user-style LayerNorm MLP), small and with seeded random weights, for
the slow test tier (tests/test_corpus.py) and `make corpus`. Entries: corpus/conf/model/*.yaml."""
