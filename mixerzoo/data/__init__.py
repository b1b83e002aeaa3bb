"""Text for language models: sources -> documents -> a token cache -> packed windows.

    from mixerzoo.data import PackedSequences, load_tokenizer, tokenize_corpus
    corpus = tokenize_corpus("corpus/", load_tokenizer("byte"), "cache/")  # tokenises once
    train = PackedSequences(corpus, seq_len=2048, split="train", seed=0)
    x = train.batch(step * 512, 512, rank=rank, world_size=world)         # [512 // world, 2048]

- :mod:`~mixerzoo.data.sources`: files, folders, JSONL, Parquet, ``hf:NAME`` -> documents;
- :mod:`~mixerzoo.data.tokenizers`: the byte tokenizer, saved ones, BPE training, bytes per token;
- :mod:`~mixerzoo.data.cache`: documents tokenised once into a memory-mapped folder;
- :mod:`~mixerzoo.data.packing`: windows of ``seq_len`` tokens, the validation split by document;
- :mod:`~mixerzoo.data.toy_text`: a small generated corpus for tests and demos.

Synthetic tasks (MQAR, selective copying) are :mod:`mixerzoo.tasks`; nothing here imports them.
"""

from .cache import TokenCorpus, tokenize_corpus
from .packing import PackedSequences, validation_mask
from .sources import DataError, iter_documents
from .tokenizers import TokenizerError, byte_tokenizer, load_tokenizer, token_byte_lengths, train_bpe

__all__ = ["DataError", "PackedSequences", "TokenCorpus", "TokenizerError", "byte_tokenizer", "iter_documents",
           "load_tokenizer", "token_byte_lengths", "tokenize_corpus", "train_bpe", "validation_mask"]
