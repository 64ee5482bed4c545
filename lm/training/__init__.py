"""Training: the loop and what keeps it going, for one process or N under torchrun.

    trainer.py            the loop: builds the model, the objective (lm/objectives/) and the optimizer
    parallel.py           torchrun environment, FSDP2 sharding, activation checkpointing, torch.compile
    optim.py              AdamW, SGD, RMSprop, Muon; learning-rate schedules
    stability.py          non-finite and spiking steps, fp16 loss scaling, rollback
    evaluation.py         in-training validation sets and eval tasks
    metrics.py            metrics.jsonl and wandb
    initialize.py         init.from: a run of ours or hf:DIR, and the shape it gives the model
    ewc.py, freeze.py     continued pretraining: elastic weight consolidation, layer freezing in phases
    plan.py               memory and FLOPs per GPU before renting them
    checkpoint.py         finding and loading checkpoints (the layout is its docstring)
    checkpoint_save.py    writing one, whole or not at all
    checkpoint_files.py   reading one's files without running code, checked against its record
"""
