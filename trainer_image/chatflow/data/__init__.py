"""The data pipeline: sources -> rendered token documents -> packed blocks -> the global mixture.

sources.py  load a source's records with Hugging Face `datasets` (hub, local files, streaming)
render.py   records -> token documents with a loss mask (pretrain, parallel, instruction)
packing.py  documents -> fixed-length blocks, document boundaries masked in the labels
store.py    a source's packed blocks cached on disk, read by (epoch-shuffled) ordinal
mixture.py  the sampler's (source, ordinal) decisions -> training samples
pipeline.py load the tokenizer, prepare every source, assemble the mixture
"""
