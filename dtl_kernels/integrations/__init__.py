"""Other frameworks' habits, for DTL models (optional dependencies, imported only when used):
:mod:`.hf_trainer` — Hugging Face ``Trainer`` whose checkpoints hold only the adapter."""
