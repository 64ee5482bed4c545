"""Data preparation for lmforge: documents -> clean/dedup -> tokenizer -> memory-mapped token shards."""
from .cleaning import CleanConfig, Cleaner
from .dedup import LSHIndex, MinHashConfig, MinHasher, exact_key, jaccard
from .errors import DataError
from .fileio import file_sha256
from .formats import jsonl_objects
from .mixture import Mixture, build_blending_indices
from .prepare import prepare, split_documents
from .shards import ShardWriter, TokenReader, dtype_for_vocab, is_prepared, read_meta
from .sources import Document, iter_documents
from .spm import SentencePieceTokenizer
from .tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer, train_tokenizer

__all__ = [
    "jsonl_objects",
    "BPETokenizer", "CharTokenizer", "CleanConfig", "Cleaner", "DataError", "Document", "LSHIndex",
    "MinHashConfig", "MinHasher", "Mixture", "SentencePieceTokenizer", "ShardWriter", "TokenReader", "Tokenizer",
    "build_blending_indices", "dtype_for_vocab", "exact_key", "file_sha256", "is_prepared", "iter_documents",
    "jaccard", "load_tokenizer", "prepare", "read_meta", "split_documents", "train_tokenizer",
]
