"""Built-in chat templates for models whose tokenizer has none."""
