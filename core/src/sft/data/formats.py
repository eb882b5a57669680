"""Record formats (alpaca, sharegpt, messages, prompt_completion, text) -> Conversation."""
