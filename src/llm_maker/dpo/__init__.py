"""Preference tuning (DPO): preference pairs, the DPO loss, the dpo stage (dpo/stage.py)."""
