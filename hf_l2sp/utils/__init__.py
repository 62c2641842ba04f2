"""Small helpers every layer may use; nothing here imports the rest of hf_l2sp."""
