"""Training: recipes, the loop for pretrain / finetune / prompt-tune, and its engines."""
