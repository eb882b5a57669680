"""PyTorch backend for sft (transformers + peft). Importing this package imports no torch.

    $ sft run --backend torch --config configs/smollm2-135m/lora.yaml

Its modules, by role (torch is imported only by those a run needs, never by `plugin`):

Registered with sft (entry point `plugin`; the hooks of the others are re-exported there)
    plugin       the backend: validation, `train` -> `train.train`
    options      the typed `torch:` section (`torch_options(plan)` reads it)
    strategy     what each `parallel.strategy` supports, checked without importing torch
    commands     CLI commands: `sft models prepare`, and core's `sft generate` / `chat` / `eval`
                 (`sft.inference_commands`) over this backend's generate and eval
    export       the `hf` and `adapter` exporters, each verified by loading it back
    bench        `sft bench`: a short measured run through the training loop
    eval         `sft eval`: held-out loss / perplexity and scored generation tasks
    generate     load a run or a model and generate with its chat template

The training run (`train.train` is the linear flow; the rest are its steps)
    train        plan -> model -> steps -> checkpoints -> final weights
    levers       `resolve_levers()`: the speed levers a run applies (and `sft bench` reports)
    micro_batch_threads  a step's micro-batches on concurrent threads (CPU)
    sample_log   which rows each rank trained (SFT_LOG_SAMPLE_IDS=1)
    data         which rows each optimizer step trains on, as tensors (core batching)
    loss         summed token cross-entropy of a micro-batch (chunked, fused), eval loss
    optim        optimizer and learning-rate schedule
    guard        stop signals and the NaN policy (decisions in `sft.guard`)
    checkpoints  what a torch checkpoint holds (the directory protocol is `sft.checkpoints`)
    outputs      the final weights in plain transformers / peft formats

The model
    model_sources  model references (built-in names, `.gguf` files, hub ids) -> cached HF dirs
    model        loading the base model exactly as the job spec says
    methods      which parameters train: LoRA / QLoRA / full / freeze
    lora         `fused_lora`: peft's LoRA Linear as one autograd Function
    dropout      `fast_dropout`: dropout masks from 16-bit lanes of 64-bit draws
    attention    `segments`: causal attention per sample of a packed row

Where it computes
    runtime      device, precision, threads, seeds and RNG state
    launch       re-launching through torchrun; a failing rank as one clear error
    distributed  process group, ranks and every collective
    engine       the `Engine` the loop drives (one process, DDP), `ForwardRoot`
    fsdp         FSDP2 sharding and consolidation of shards
    deepspeed    DeepSpeed ZeRO-2 / ZeRO-3 config and engine
"""
