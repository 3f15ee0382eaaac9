"""The finetune engine."""
