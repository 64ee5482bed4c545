"""Data preparation for lmforge: documents -> tokenizer -> memory-mapped token shards."""
from .errors import DataError
from .fileio import file_sha256
from .prepare import prepare, split_documents
from .shards import ShardWriter, TokenReader, dtype_for_vocab, is_prepared, read_meta
from .sources import Document, iter_documents
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer", "CharTokenizer", "DataError", "Document", "ShardWriter", "TokenReader", "Tokenizer",
    "dtype_for_vocab", "file_sha256", "is_prepared", "iter_documents", "load_tokenizer", "prepare",
    "read_meta", "split_documents",
]
