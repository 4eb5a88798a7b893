"""The methods, side by side: `file.py` and `inference/`, each a prepare step and an annotator."""
