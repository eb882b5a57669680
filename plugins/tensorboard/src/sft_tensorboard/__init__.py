"""sft-tensorboard: writes RUN_DIR/tensorboard/ event files from sft's lifecycle hooks.

$ pip install -e plugins/tensorboard
$ tensorboard --logdir runs/
"""
