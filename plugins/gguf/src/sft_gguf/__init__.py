"""sft-gguf: export a fine-tuned llama or qwen2 model to GGUF for llama.cpp / Ollama, verified.

Installed, it registers the `gguf` export format through the `sft_register_exporters` hook:

    $ pip install -e plugins/gguf
    $ sft export runs/smollm2-135m-lora --format gguf --dtype q8_0 --out exports/

Modules: `plugin` (registration and the export flow), `source` (which HF directory to convert,
numpy-only safetensors reading), `arch` (llama/qwen2 hyperparameters and tensor names), `vocab`
(tokenizer metadata), `writer` (the GGUF file) and `verify` (read it back and compare).
"""

__version__ = "0.1.0"
