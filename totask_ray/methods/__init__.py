"""The methods, side by side: `file.py` and `inference.py`, each a prepare step and an annotator."""
