"""Training data as the trainer reads it (preparing it is data_prep/).

    batches.py   samples from prepared token shards by global index (exact resume), mixtures, prefetch
    augment.py   noise on the tokens a model reads (data.augment), never on those it predicts
"""
