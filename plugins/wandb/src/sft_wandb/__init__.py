"""sft-wandb: records sft runs with Weights & Biases (`logging.trackers: [wandb]`), offline
unless WANDB_MODE says otherwise.

$ pip install -e plugins/wandb
$ wandb sync runs/NAME/wandb/offline-run-*      # upload later
"""
