"""Other formats: Hugging Face directories in and out.

    hf.py         our GPT <-> GPT-2's HF layout; reading config.json and (sharded) safetensors
    hf_llama.py   our GPT with Llama's options <-> LlamaForCausalLM's layout
    export.py     a checkpoint -> an HF model directory or our own safetensors (`python -m lm.export`)
"""
