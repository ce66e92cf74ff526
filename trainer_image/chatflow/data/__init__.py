"""The data pipeline: sources -> rendered token documents -> packed blocks -> the global mixture.

sources.py    a source's input shards (file byte ranges, parquet row groups, hub shards)
render.py     records -> token documents with a loss mask (pretrain, parallel, instruction)
packing.py    documents -> fixed-length blocks, document boundaries masked in the labels
store.py      a source's packed blocks cached on disk shard by shard, read by (shuffled) ordinal
prepare.py    the run's need of each source; its shards prepared by N worker processes
progress.py   a preparation's progress: terminal line, JSON lines, Prometheus metrics
mixture.py    the sampler's (source, ordinal) decisions -> training samples
pipeline.py   load the tokenizer, prepare (or open) every source, assemble the mixture
"""
