"""Fine-tuning methods applied to a plain model from the outside: low-rank adapters (`lora`)."""
