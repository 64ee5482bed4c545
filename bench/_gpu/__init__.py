"""The stages of `bench/gpu.py`: each a generator of table rows, run in its own process.

measure.py          the stage context, the timer, the FLOP/byte formulas, process helpers
kernel_stages.py    env, kernel_check, attention_speed, layernorm_speed
training_stages.py  data, e2e_eager, e2e_compiled, train_1p3b, quickstart_200
"""
